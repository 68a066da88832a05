"""compress: replace a Llama's decoder linears by factor pairs chosen with task data."""
