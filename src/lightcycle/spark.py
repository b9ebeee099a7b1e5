"""The Spark session that `predict -P engine=spark` and `train -P engine=spark` share: Java and
pyspark checks, `spark_conf` parsing, and the session (spark-submit's, a notebook's, or local[N])."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager

from lightcycle.errors import UserError

LOCAL_MASTER = "local[2]"
MIN_JAVA = 17
JAVA_HELP = ("install a Java 17 or 21 runtime: on Debian/Ubuntu `sudo apt-get install -y "
             "openjdk-17-jre-headless` (`make test` does it when run as root), or set JAVA_HOME "
             "to a JDK/JRE 17+")


def java_unavailable_reason(env: dict[str, str] | None = None) -> str | None:
    """None if a usable java is there (JAVA_HOME's, else PATH's), else what is wrong and the fix."""
    env = dict(os.environ if env is None else env)
    java_home = env.get("JAVA_HOME")
    if java_home:
        java = os.path.join(java_home, "bin", "java")
        if not os.access(java, os.X_OK):
            return (f"JAVA_HOME is {java_home}, which has no bin/java. Spark needs Java: "
                    f"{JAVA_HELP}.")
    else:
        java = shutil.which("java", path=env.get("PATH", ""))
        if java is None:
            return f"Spark needs Java and there is no `java` on PATH and no JAVA_HOME: {JAVA_HELP}."
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{java} -version failed ({exc}). Spark needs Java: {JAVA_HELP}."
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if out.returncode != 0 or not match:
        return f"{java} -version failed: {(out.stderr or out.stdout).strip()[:300]}. {JAVA_HELP}."
    major = int(match[1]) if match[1] != "1" else int(match[2] or 0)
    if major < MIN_JAVA:
        return f"{java} is Java {major}; Spark 4 needs Java {MIN_JAVA} or newer: {JAVA_HELP}."
    return None


def require_spark() -> None:
    """Fail with the fix before anything slow when pyspark or Java is missing."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise UserError("engine=spark needs pyspark: pip install -r requirements.txt "
                        "(it pins pyspark).") from None
    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        return  # started by spark-submit: its JVM is already running
    reason = java_unavailable_reason()
    if reason:
        raise UserError(f"engine=spark: {reason}")


def parse_spark_conf(text: str) -> dict[str, str]:
    """`key=value,key=value` (commas or newlines). A piece without `=` continues the previous
    value, so list values work: `spark.jars=a.jar,b.jar,spark.executor.memory=4g`."""
    conf: dict[str, str] = {}
    last = None
    for piece in re.split(r"[,\n]", text or ""):
        if "=" in piece and re.match(r"^\s*[A-Za-z][\w.\-]*\s*=", piece):
            key, value = piece.split("=", 1)
            last = key.strip()
            conf[last] = value.strip()
        elif piece.strip():
            if last is None:
                raise UserError(f"spark_conf {text!r}: {piece.strip()!r} is not key=value; write "
                                "spark_conf as key=value,key=value (e.g. "
                                "spark.executor.memory=4g,spark.sql.shuffle.partitions=64).")
            conf[last] += "," + piece.strip()
    return conf


def spark_session(master: str = "", conf: str | dict[str, str] = "", app: str = "lightcycle",
                  local_master: str = LOCAL_MASTER):
    """A SparkSession. `master` empty: the one spark-submit (or a notebook) set up, else
    `local_master`.

    In local mode the executors' Python is this interpreter, the UI is off, and shuffles use as
    many partitions as there are cores.
    """
    require_spark()
    from pyspark.sql import SparkSession

    settings = parse_spark_conf(conf) if isinstance(conf, str) else dict(conf)
    builder = SparkSession.builder.appName(app)
    managed = bool(os.environ.get("PYSPARK_GATEWAY_PORT")) or SparkSession.getActiveSession()
    if master or not managed:
        master = master or local_master
        builder = builder.master(master)
    if (master or "").startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        settings = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
                    "spark.sql.shuffle.partitions": "2", **settings}
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("LIGHTCYCLE_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def is_local_master(spark) -> bool:
    """True when the executors run beside the driver (local[N]): they see its disk."""
    return spark.sparkContext.master.startswith("local")


@contextmanager
def spark_job(master: str, conf: str, app: str, local_master: str = LOCAL_MASTER):
    """A step's Spark session: joined if spark-submit or a notebook started one, else started
    here (`master`, else `local_master`) and stopped when the step is done."""
    require_spark()
    from pyspark.sql import SparkSession

    existing = SparkSession.getActiveSession()
    spark = spark_session(master, conf, app, local_master)
    print(f"spark {spark.version}: master {spark.sparkContext.master}, "
          f"{spark.sparkContext.defaultParallelism} cores", flush=True)
    try:
        yield spark
    finally:
        if existing is None and not os.environ.get("PYSPARK_GATEWAY_PORT"):
            spark.stop()
