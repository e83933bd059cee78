from .perplexity import PerplexityResult, nll_of_windows, perplexity, perplexity_of_windows, tokenize_windows
from .zeroshot import DEFAULT_TASKS, TASKS, TaskResult, evaluate_zeroshot, loglikelihoods, run_lm_eval

__all__ = ["DEFAULT_TASKS", "TASKS", "PerplexityResult", "TaskResult", "evaluate_zeroshot", "loglikelihoods",
           "nll_of_windows", "perplexity", "perplexity_of_windows", "run_lm_eval", "tokenize_windows"]
