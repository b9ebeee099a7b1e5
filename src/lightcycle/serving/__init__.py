"""Serving: the deployable pyfunc, the scoring server, batch prediction and the client. Never imports training."""
