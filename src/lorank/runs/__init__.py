"""The runs below the API's verbs: loading the inputs (`inputs`), the gradient spectrum
(`gradient`), the one-run probe (`probe`), and running an estimator by name (`estimate`).

`lorank.api` re-exports the names its callers use (`prepare_inputs`, `run_probe`, ...)."""
