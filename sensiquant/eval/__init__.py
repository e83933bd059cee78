from .perplexity import PerplexityResult, perplexity, tokenize_windows

__all__ = ["PerplexityResult", "perplexity", "tokenize_windows"]
