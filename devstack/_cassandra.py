"""Apache Cassandra 5.0 as its own JVM, from the Maven Central jars, on Java 17."""

from __future__ import annotations

import os
import re
import shutil
import string
import subprocess
from pathlib import Path

from devstack._proc import ManagedProcess, StackError, say

CASSANDRA_VERSION = "5.0.8"
HERE = Path(__file__).resolve().parent / "cassandra"

#: From Cassandra 5.0's conf/jvm17-server.options (and bin/cassandra.in.sh): without these, Java 17's module
#: system refuses the reflection Cassandra relies on ("unable to access required classes").
JVM17_OPTIONS = [
    "-Djdk.attach.allowAttachSelf=true",
    *(
        f"--add-exports={m}=ALL-UNNAMED"
        for m in (
            "java.base/jdk.internal.misc",
            "java.management.rmi/com.sun.jmx.remote.internal.rmi",
            "java.rmi/sun.rmi.registry",
            "java.rmi/sun.rmi.server",
            "java.sql/java.sql",
            "java.base/java.lang.ref",
            "jdk.unsupported/sun.misc",
        )
    ),
    *(
        f"--add-opens={m}=ALL-UNNAMED"
        for m in (
            "java.base/java.lang.module",
            "java.base/jdk.internal.loader",
            "java.base/jdk.internal.ref",
            "java.base/jdk.internal.reflect",
            "java.base/jdk.internal.math",
            "java.base/jdk.internal.module",
            "java.base/jdk.internal.util.jar",
            "jdk.management/com.sun.management.internal",
            "java.base/sun.nio.ch",
            "java.base/java.io",
            "java.base/java.lang.reflect",
            "java.base/java.lang",
            "java.base/java.util",
            "java.base/java.nio",
        )
    ),
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dio.netty.allocator.useCacheForAllThreads=true",
    "-Dio.netty.allocator.maxOrder=11",
]


def jars_dir(cache: Path) -> Path:
    return cache / f"cassandra-{CASSANDRA_VERSION}" / "lib"


def fetch_jars(cache: Path) -> Path:
    """Resolve cassandra-all and its runtime dependencies with mvn into the cache, once."""
    lib = jars_dir(cache)
    done = lib.parent / ".complete"
    if done.exists():
        return lib
    mvn = shutil.which("mvn")
    if not mvn:
        raise StackError("mvn (Apache Maven) is needed to fetch Cassandra's jars: sudo apt-get install -y maven")
    say(f"fetching Apache Cassandra {CASSANDRA_VERSION} jars from Maven Central with mvn (once; about 70 MB) ...")
    lib.parent.mkdir(parents=True, exist_ok=True)
    partial = lib.parent / "lib.partial"
    shutil.rmtree(partial, ignore_errors=True)
    argv = [
        mvn, "-B", "-f", str(HERE / "pom.xml"),
        "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={partial}",
        f"-Dcassandra.version={CASSANDRA_VERSION}",
    ]  # fmt: skip
    log_path = cache / "mvn.log"
    fetched = 0
    with (
        log_path.open("w") as log,
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            # mvn prints one "Downloaded from central: URL (size at speed)" line per file: show them as progress.
            m = re.search(r"Downloaded from \S+: \S+/([^/\s]+\.jar) \(([^)]*?)(?: at [^)]*)?\)", line)
            if m:
                fetched += 1
                say(f"  [{fetched:3d}] {m.group(1)} ({m.group(2)})")
    if proc.returncode != 0:
        raise StackError(
            f"mvn could not resolve cassandra-all {CASSANDRA_VERSION}; log: {log_path}\n"
            + "\n".join(log_path.read_text().splitlines()[-15:])
        )
    shutil.rmtree(lib, ignore_errors=True)
    partial.rename(lib)
    done.write_text(CASSANDRA_VERSION)
    say(f"Cassandra jars ready in {lib} ({len(list(lib.glob('*.jar')))} jars)")
    return lib


def _java_major(java_home: Path) -> int | None:
    release = java_home / "release"
    try:
        m = re.search(r'JAVA_VERSION="(\d+)(?:\.(\d+))?', release.read_text())
    except FileNotFoundError:
        return None
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def find_java17() -> Path:
    """A Java 17 (or 11) runtime: JAVA_HOME when it fits, else one under /usr/lib/jvm."""
    candidates: list[Path] = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]))
    jvm = Path("/usr/lib/jvm")
    if jvm.is_dir():
        candidates += sorted(p for p in jvm.iterdir() if p.is_dir() and not p.is_symlink())
    seen: list[str] = []
    for home in candidates:
        major = _java_major(home)
        seen.append(f"{home} (Java {major})")
        if major == 17 and (home / "bin" / "java").exists():
            return home / "bin" / "java"
    for home in candidates:
        if _java_major(home) == 11 and (home / "bin" / "java").exists():
            return home / "bin" / "java"
    raise StackError(
        "Cassandra 5.0 needs Java 17 (or 11); Java 24+ refuses its SecurityManager. Looked at: "
        + (", ".join(seen) or "nothing")
        + ". Install one (sudo apt-get install -y openjdk-17-jre-headless) or set JAVA_HOME."
    )


def cassandra_process(
    root: Path, cache: Path, *, profile: str, native_port: int, storage_port: int, jmx_port: int, heap_mb: int
) -> ManagedProcess:
    lib = fetch_jars(cache)
    java = find_java17()
    conf = root / "cassandra" / "conf"
    data = root / "cassandra" / "data"
    tmp = root / "cassandra" / "tmp"
    for d in (conf, data, tmp):
        d.mkdir(parents=True, exist_ok=True)
    yaml_text = string.Template((HERE / "cassandra.yaml.template").read_text()).substitute(
        profile=profile, native_port=native_port, storage_port=storage_port
    )
    (conf / "cassandra.yaml").write_text(yaml_text)
    shutil.copy(HERE / "logback.xml", conf / "logback.xml")
    argv = [
        str(java),
        f"-Xms{min(heap_mb, 512)}m", f"-Xmx{heap_mb}m", "-Xss256k",
        "-XX:+UseG1GC", "-XX:+ExitOnOutOfMemoryError", "-Djava.net.preferIPv4Stack=true",
        *JVM17_OPTIONS,
        "-Dcassandra-foreground=yes",
        f"-Dcassandra.config=file://{conf / 'cassandra.yaml'}",
        f"-Dcassandra.storagedir={data}",
        f"-Dcassandra.logdir={root / 'logs'}",
        f"-Dlogback.configurationFile={conf / 'logback.xml'}",
        f"-Dcassandra.jmx.local.port={jmx_port}",
        f"-Djava.io.tmpdir={tmp}",
        # One node: skip the waits that let a ring settle.
        "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        "-Dcassandra.ring_delay_ms=1000",
        "-Dcassandra.superuser_setup_delay_ms=0",
        "-cp", f"{conf}:{lib}/*",
        "org.apache.cassandra.service.CassandraDaemon",
    ]  # fmt: skip
    return ManagedProcess(
        "cassandra",
        argv,
        log_path=root / "logs" / "cassandra.log",
        pid_path=root / "run" / "cassandra.pid",
        marker=str(conf),
    )


def start_cassandra(proc: ManagedProcess, native_port: int, timeout: float = 180.0) -> float:
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
    from cassandra.policies import WhiteListRoundRobinPolicy

    def answers_cql() -> bool:
        profile = ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy(["127.0.0.1"]), request_timeout=5)
        cluster = Cluster(
            ["127.0.0.1"],
            port=native_port,
            connect_timeout=2,
            control_connection_timeout=2,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        )
        try:
            session = cluster.connect()
            session.execute("SELECT release_version FROM system.local")
            return True
        except (NoHostAvailable, OSError, Exception):  # noqa: BLE001 - any failure means "not yet"
            return False
        finally:
            cluster.shutdown()

    say(f"starting Cassandra {CASSANDRA_VERSION} on 127.0.0.1:{native_port} (log: {proc.log_path})")
    proc.start()
    took = proc.wait_ready(_log_says_listening(proc), timeout=timeout, what="starting up", every=5.0)
    took += proc.wait_ready(answers_cql, timeout=60, what="answering CQL", every=5.0)
    say(f"Cassandra ready in {took:.1f} s")
    return took


def _log_says_listening(proc: ManagedProcess):  # type: ignore[no-untyped-def]
    # Polling the log first is cheap; a CQL client per poll would spam Cassandra's log while it boots.
    def check() -> bool:
        try:
            with proc.log_path.open("rb") as f:
                return b"Starting listening for CQL clients" in f.read()
        except FileNotFoundError:
            return False

    return check
