"""Walk a deployable back to the data it was trained on, using only the tracking server."""

from __future__ import annotations

from mlflow import MlflowClient

from lightcycle import defaults
from lightcycle.lifecycle import registry, tracking


def describe(model_uri: str) -> str:
    client = MlflowClient()
    ref = registry.resolve(model_uri, client)
    mv = client.get_model_version(ref.name, ref.version)
    lines = [f"{model_uri} -> {ref.uri} (aliases: {', '.join(mv.aliases) or 'none'})"]
    tags = mv.tags
    source_uri = tags.get(registry.TAG_SOURCE_VERSION)
    if source_uri:
        lines += [
            f"  deployable   {ref.uri}: {tags.get('lightcycle.conversion', '?')}, parity "
            f"max|diff|={tags.get('lightcycle.parity_max_abs_diff', '?')}, argmax mismatches="
            f"{tags.get('lightcycle.parity_argmax_mismatches', '?')}",
            f"  gate         {tags.get('lightcycle.gate.decision', 'not gated')}: accuracy "
            f"{tags.get('lightcycle.gate.accuracy', '?')} (min {tags.get('lightcycle.gate.min_accuracy', '?')}, "
            f"champion had {tags.get('lightcycle.gate.champion_accuracy') or 'none'}), "
            f"run {tags.get('lightcycle.gate.run_id', '?')}",
        ]
        eager_ref = registry.resolve(source_uri, client)
        eager = client.get_model_version(eager_ref.name, eager_ref.version)
    else:
        eager_ref, eager = ref, mv
    run_id = eager.tags.get(registry.TAG_SOURCE_RUN) or eager.run_id
    lines.append(f"  eager        {eager_ref.uri}: test accuracy "
                 f"{eager.tags.get(registry.TAG_TEST_ACCURACY, '?')}")
    run = client.get_run(run_id)
    params = ", ".join(f"{k}={run.data.params[k]}" for k in defaults.TRAIN if k in run.data.params)
    lines += [
        f"  training run {run_id} ({run.info.status}): {params}",
        f"  git commit   {run.data.tags.get(tracking.TAG_GIT_COMMIT, 'none (not a git checkout)')}",
        f"  code version {run.data.tags.get(tracking.TAG_CODE_VERSION, '?')}",
        f"  data digest  {run.data.tags.get(tracking.TAG_DATA_DIGEST, '?')}",
    ]
    return "\n".join(lines)
