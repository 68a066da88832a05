"""llama.cpp opened the same way by every bench script (llama-cpp-python, in bench/.venv-llama).

Imported by path from the scripts' halves that run in that venv, so it needs llama_cpp only.
"""

from __future__ import annotations


def open_llama(path: str, n_ctx: int, threads: int, logits_all: bool = False):
    """A Llama with llama.cpp's extra CPU buffer types off (use_extra_bufts=False): on this VM the
    CPU reports AMX, the native build uses it through those buffers, and the first eval dies with
    SIGILL. llama-cpp-python has no argument for it, so its model-params default is wrapped while
    the model loads."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    default = llama_module.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                               logits_all=logits_all, verbose=False, seed=0)
    finally:
        llama_module.llama_cpp.llama_model_default_params = default
