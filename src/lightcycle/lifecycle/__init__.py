"""The MLflow lifecycle: tracking, registry, conversion, promotion, the chain and its cache. Never imports Lightning."""
