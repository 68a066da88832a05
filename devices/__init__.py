"""devices: device profiles and the runners that reach them."""
