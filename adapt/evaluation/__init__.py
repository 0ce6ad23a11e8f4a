"""Stage 4, eval: the harness behind `dlm-adapt eval` (`harness`) and the lm-evaluation-harness backend
(`lm_eval_backend`). The likelihoods themselves live with the objective, in `adapt.training.likelihood`."""
