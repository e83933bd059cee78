from .perplexity import PerplexityResult, perplexity, tokenize_windows
from .zeroshot import DEFAULT_TASKS, TASKS, TaskResult, evaluate_zeroshot, loglikelihoods, run_lm_eval

__all__ = ["DEFAULT_TASKS", "TASKS", "PerplexityResult", "TaskResult", "evaluate_zeroshot", "loglikelihoods",
           "perplexity", "run_lm_eval", "tokenize_windows"]
