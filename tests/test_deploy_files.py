"""The deployment files: the Kubernetes manifests under k8s/ (parsed, cross-checked against each other,
the engine's flag parser and the serve config schema) and the nginx front nginx/sglang-gw.conf
(its directives; `nginx -t`; and, where nginx and openssl are installed, a live run over TLS in front
of a slow SSE server, which shows that events are passed on one by one)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from sglang_gw.cli import build_parser
from sglang_gw.config import load_serve_config, parse_serve_config
from sglang_gw.engine.settings import EngineArgs, from_flags
from sglang_gw.gateway.config import GatewaySettings
from sglang_gw.testing import DONE, free_port, sse_event

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
NGINX_CONF = REPO / "nginx" / "sglang-gw.conf"


# ---- Kubernetes ------------------------------------------------------------------------------------


def _k8s_docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def _resource(kind: str, name: str) -> dict:
    found = [doc for _, doc in _k8s_docs() if doc.get("kind") == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} under k8s/, found {len(found)}"
    return found[0]


def _container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _container_port(container: dict, ref) -> int:
    """A port reference (number or name, as in probes and targetPort) resolved against the container."""
    for port in container.get("ports", []):
        if ref == port.get("name") or ref == port["containerPort"]:
            return port["containerPort"]
    raise AssertionError(f"port {ref!r} is not one of the container's ports {container.get('ports')}")


def _probe_target(container: dict, probe: str) -> tuple[str, int]:
    get = container[probe]["httpGet"]
    return get["path"], _container_port(container, get["port"])


def _engine_args(container: dict) -> EngineArgs:
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[:2] == ["sglang-gw", "engine"], argv
    return from_flags(build_parser().parse_args(argv[1:]), EngineArgs, "the engine container")  # as the engine would


def _gateway_config_raw() -> dict:
    cm = _resource("ConfigMap", "sglang-gw-config")
    raw = yaml.safe_load(cm["data"]["config.yaml"])
    assert isinstance(raw, dict)
    return raw


def test_k8s_files_parse_and_name_their_resources():
    docs = _k8s_docs()
    files = {name for name, _ in docs}
    assert {"engine-statefulset.yaml", "engine-service.yaml", "gateway-configmap.yaml",
            "gateway-deployment.yaml", "gateway-service.yaml"} <= files
    for name, doc in docs:
        assert isinstance(doc, dict), name
        assert doc.get("apiVersion") and doc.get("kind"), name
        assert doc.get("metadata", {}).get("name"), name
        # Namespace-agnostic: `kubectl apply -n NS` decides.
        assert "namespace" not in doc["metadata"], f"{name}: {doc['kind']} hard-codes a namespace"
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for _, doc in docs)
    assert len(kinds) == len(set(kinds)), kinds


def test_engine_statefulset():
    sts = _resource("StatefulSet", "sglang-gw-engine")
    spec = sts["spec"]
    assert spec["replicas"] == 2
    assert spec["serviceName"] == "sglang-gw-engines"
    assert _selects(spec["selector"]["matchLabels"], _pod_labels(sts))
    c = _container(sts)
    assert c["image"] == "ghcr.io/your-org/sglang-gw:0.1.0"
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1

    # The command is a valid engine invocation, listening where the probes and the Service look.
    args = _engine_args(c)
    assert args.device == "cuda" and args.host == "0.0.0.0" and args.port == 30000
    assert _container_port(c, args.port) == 30000
    mounts = [m["mountPath"] for m in c["volumeMounts"]]
    assert any(args.model.startswith(m.rstrip("/") + "/") for m in mounts), (args.model, mounts)
    volumes = {v["name"] for v in spec["template"]["spec"]["volumes"]}
    assert {m["name"] for m in c["volumeMounts"]} <= volumes

    for probe in ("startupProbe", "readinessProbe"):
        assert _probe_target(c, probe) == ("/health", args.port), probe
    # Liveness sees a hang, never load (issue 12): the heartbeat's limit, and a minute of silence.
    assert _probe_target(c, "livenessProbe") == ("/health?max_since_progress=60", args.port)
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60 and liveness["timeoutSeconds"] >= 10
    startup = c["startupProbe"]
    loading_budget = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup.get(
        "failureThreshold", 3)
    assert loading_budget >= 600, "the startup probe must allow minutes of model loading"
    # SIGTERM drains the engine for --graceful-shutdown-timeout: the kubelet must wait longer.
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == 60 and grace > args.graceful_shutdown_timeout


def test_engine_headless_service_selects_the_engine_pods():
    svc = _resource("Service", "sglang-gw-engines")
    sts = _resource("StatefulSet", "sglang-gw-engine")
    gw = _resource("Deployment", "sglang-gw-gateway")
    spec = svc["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is False
    assert _selects(spec["selector"], _pod_labels(sts))
    # The gateway's DNS discovery must not find the gateway pods themselves.
    assert not _selects(spec["selector"], _pod_labels(gw))
    (port,) = spec["ports"]
    assert port["port"] == 30000
    assert _container_port(_container(sts), port.get("targetPort", port["port"])) == 30000


def test_gateway_deployment():
    gw = _resource("Deployment", "sglang-gw-gateway")
    spec = gw["spec"]
    assert spec["replicas"] == 2
    assert _selects(spec["selector"]["matchLabels"], _pod_labels(gw))
    c = _container(gw)
    argv = [*c.get("command", []), *c.get("args", [])]
    assert argv[:2] == ["sglang-gw", "serve"] and len(argv) == 3, argv
    config_path = Path(argv[2])
    assert _probe_target(c, "readinessProbe") == ("/ready", 8000)
    assert _probe_target(c, "livenessProbe") == ("/health", 8000)
    assert "nvidia.com/gpu" not in str(c.get("resources", {}))

    # The config file the command names comes from the ConfigMap's config.yaml.
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    config_volume = volumes[mounts[str(config_path.parent)]]
    assert config_volume["configMap"]["name"] == "sglang-gw-config"
    items = config_volume["configMap"].get("items")
    assert items is None or {"key": "config.yaml", "path": config_path.name} in items
    if items is None:
        assert config_path.name == "config.yaml"

    # API keys: an optional Secret (the pod starts without it), mounted beside the config, not into it.
    (keys,) = [v for v in volumes.values() if "secret" in v]
    assert keys["secret"]["secretName"] == "sglang-gw-keys" and keys["secret"]["optional"] is True
    (keys_mount,) = [path for path, name in mounts.items() if name == keys["name"]]
    assert not keys_mount.startswith(str(config_path.parent) + "/")
    # Where the README (and the ConfigMap's comment) say keys_file points.
    assert f"{keys_mount}/keys.yaml" in (K8S / "README.md").read_text()
    keys_file = _gateway_config_raw()["gateway"].get("auth", {}).get("keys_file")
    assert keys_file is None or keys_file == f"{keys_mount}/keys.yaml"


def test_gateway_configmap_is_a_valid_serve_config(tmp_path):
    raw = _gateway_config_raw()
    config = parse_serve_config(raw, "k8s/gateway-configmap.yaml")
    assert config.engines == [] and config.remote_workers == []
    gw = _resource("Deployment", "sglang-gw-gateway")
    assert config.gateway.host == "0.0.0.0"
    assert config.gateway.port == _container_port(_container(gw), "http") == 8000

    discovery = config.gateway.discovery
    assert discovery is not None
    engines = _resource("Service", "sglang-gw-engines")
    assert discovery.dns.startswith(engines["metadata"]["name"] + ".")
    assert discovery.dns == "sglang-gw-engines.default.svc.cluster.local"
    assert discovery.port == engines["spec"]["ports"][0]["port"]
    assert discovery.interval == 10

    # The file as the gateway pod reads it (through load_serve_config, which also merges a keys_file).
    auth = raw["gateway"].get("auth") or {}
    if auth.get("keys_file"):
        (tmp_path / "keys.yaml").write_text("[]\n")
        raw["gateway"]["auth"] = dict(auth, keys_file="keys.yaml")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_serve_config(path).gateway.discovery == discovery


def test_gateway_service_targets_the_gateway_port():
    svc = _resource("Service", "sglang-gw")
    gw = _resource("Deployment", "sglang-gw-gateway")
    sts = _resource("StatefulSet", "sglang-gw-engine")
    spec = svc["spec"]
    assert spec.get("type", "ClusterIP") == "ClusterIP" and spec.get("clusterIP") != "None"
    assert _selects(spec["selector"], _pod_labels(gw))
    assert not _selects(spec["selector"], _pod_labels(sts))
    (port,) = spec["ports"]
    assert port["port"] == 80
    assert _container_port(_container(gw), port["targetPort"]) == 8000


# ---- nginx: the directives ---------------------------------------------------------------------------


def _nginx_parse(text: str) -> list:
    """nginx config text → [(name, [args], children or None)], comments dropped."""
    tokens = re.findall(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|#[^\n]*|[{};]|[^\s{};"\'#]+', text)
    stack: list[list] = [[]]
    current: list[str] = []
    for tok in tokens:
        if tok.startswith("#"):
            continue
        if tok == ";":
            assert current, "empty directive"
            stack[-1].append((current[0], current[1:], None))
            current = []
        elif tok == "{":
            block: list = []
            stack[-1].append((current[0], current[1:], block))
            stack.append(block)
            current = []
        elif tok == "}":
            assert not current and len(stack) > 1, "unbalanced }"
            stack.pop()
        else:
            current.append(tok[1:-1] if tok[0] in "\"'" else tok)
    assert len(stack) == 1 and not current, "unterminated block or directive"
    return stack[0]


def _find(block: list, name: str) -> list:
    return [d for d in block if d[0] == name]


def _value(name: str, *scopes: list) -> list[str] | None:
    """The arguments of `name` as nginx applies it: the innermost scope that sets it wins."""
    for scope in scopes:
        found = _find(scope, name)
        if found:
            return found[-1][1]
    return None


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert m, value
    return int(m[1]) * units[m[2] or "s"]


def _bytes(value: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert m, value
    return int(m[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[m[2].lower()]


def test_nginx_conf_directives():
    top = _nginx_parse(NGINX_CONF.read_text())
    # Includable inside http {}: only http-level blocks, no http/events/main-context directives.
    assert {d[0] for d in top} <= {"map", "upstream", "server"}, [d[0] for d in top]

    (upstream,) = [d for d in _find(top, "upstream") if d[1] == ["sglang_gw"]]
    assert [d[1] for d in _find(upstream[2], "server")] == [["127.0.0.1:8000"]]
    assert int(_value("keepalive", upstream[2])[0]) >= 1

    servers = [d[2] for d in _find(top, "server")]
    tls = [s for s in servers if any("ssl" in d[1] for d in _find(s, "listen"))]
    plain = [s for s in servers if s not in tls]
    assert len(tls) == 1 and len(plain) == 1
    (tls,), (plain,) = tls, plain
    assert any(d[1][0] == "443" for d in _find(tls, "listen"))
    assert _value("ssl_certificate", tls) == ["/etc/nginx/tls/sglang-gw.crt"]
    assert _value("ssl_certificate_key", tls) == ["/etc/nginx/tls/sglang-gw.key"]
    assert any(d[1][0] == "80" for d in _find(plain, "listen"))
    (ret,) = _find(plain, "return")
    assert ret[1][0] in {"301", "302", "307", "308"} and ret[1][1].startswith("https://")

    (location,) = [d[2] for d in _find(tls, "location") if d[1] == ["/"]]
    assert _value("proxy_pass", location) == ["http://sglang_gw"]
    scopes = (location, tls)
    assert _value("proxy_http_version", *scopes) == ["1.1"]
    assert _value("proxy_buffering", *scopes) == ["off"]
    assert _value("proxy_request_buffering", *scopes) == ["off"]
    assert _value("gzip", *scopes) in (None, ["off"])
    defaults = GatewaySettings()
    assert _seconds(_value("proxy_read_timeout", *scopes)[0]) >= max(3600, defaults.request_timeout)
    assert _seconds(_value("proxy_send_timeout", *scopes)[0]) >= max(3600, defaults.request_timeout)
    # The same body limit as the gateway's own, so nginx answers 413 exactly where the gateway would.
    assert _bytes(_value("client_max_body_size", *scopes)[0]) == defaults.max_request_bytes

    # proxy_set_header is all-or-nothing per level: the location's set replaces the server's.
    headers = {args[0].lower(): args[1] for _, args, _ in
               (_find(location, "proxy_set_header") or _find(tls, "proxy_set_header"))}
    assert headers["connection"] == ""
    assert headers["authorization"] == "$http_authorization"
    assert headers["x-forwarded-for"] == "$proxy_add_x_forwarded_for"
    assert headers["x-forwarded-proto"] == "$scheme"
    request_id = headers["x-request-id"]
    (rid_map,) = [d for d in _find(top, "map") if d[1] == ["$http_x_request_id", request_id]]
    assert dict((k, v[0]) for k, v, _ in rid_map[2]) == {"": "$request_id", "default": "$http_x_request_id"}


# ---- nginx: the real thing ---------------------------------------------------------------------------

needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None or shutil.which("openssl") is None,
                                 reason="nginx and openssl are not both installed")

EVENTS = 5
EVENT_GAP = 0.2  # seconds between two SSE events from the slow upstream


def _nginx_has_http2() -> bool:
    out = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=10)
    return "http_v2_module" in out.stdout + out.stderr


class SlowSSE:
    """An aiohttp server in a thread, standing in for the gateway: SSE events EVENT_GAP apart."""

    def __init__(self):
        self.requests: list[dict] = []
        self.sent: dict[str, list[float]] = {}  # x-request-id → time each event was about to be written
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _stream(self, request):
        from aiohttp import web

        body = await request.read()
        rid = request.headers.get("X-Request-Id", "")
        self.requests.append({"path": request.path, "headers": request.headers.copy(), "body": body,
                              "version": tuple(request.version), "keep_alive": request.keep_alive,
                              "peer": request.transport.get_extra_info("peername")})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Request-Id": rid})
        await resp.prepare(request)
        times = self.sent.setdefault(rid, [])
        for i in range(EVENTS):
            times.append(time.monotonic())
            await resp.write(f"data: {json.dumps({'index': i})}\n\n".encode())
            await asyncio.sleep(EVENT_GAP)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def __enter__(self):
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._stream)
        app.router.add_post("/v1/completions", self._stream)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.SockSite(self.runner, self.sock).start())
        self.thread.start()
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _write_nginx(tmp: Path, upstream_port: int, https_port: int, http_port: int) -> Path:
    """nginx.conf in `tmp` that includes a copy of nginx/sglang-gw.conf rewritten for this test:
    the certificate from `tmp`, local ports, the slow SSE server as upstream."""
    crt, key = tmp / "tls.crt", tmp / "tls.key"
    if not crt.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(crt)],
                       check=True, capture_output=True, timeout=60)

    text = NGINX_CONF.read_text()
    subs = [
        (r"(?m)^(\s*server\s+)127\.0\.0\.1:8000;", rf"\g<1>127.0.0.1:{upstream_port};"),
        (r"(?m)^(\s*listen\s+)443\b", rf"\g<1>127.0.0.1:{https_port}"),
        (r"(?m)^(\s*listen\s+)80\b", rf"\g<1>127.0.0.1:{http_port}"),
        (r"(?m)^(\s*ssl_certificate\s+)\S+;", rf"\g<1>{crt};"),
        (r"(?m)^(\s*ssl_certificate_key\s+)\S+;", rf"\g<1>{key};"),
    ]
    for pattern, repl in subs:
        text, n = re.subn(pattern, repl, text)
        assert n == 1, f"nginx/sglang-gw.conf: expected one match of {pattern!r}, found {n}"
    if not _nginx_has_http2():  # a build without the HTTP/2 module: test everything else
        text = re.sub(r"(?m)^(\s*listen\s+[^;#]*?)\s+http2\b", r"\1", text)
        text = re.sub(r"(?m)^\s*http2\s+on\s*;", "", text)
    (tmp / "sglang-gw.conf").write_text(text)

    temp_paths = "\n".join(f"    {kind}_temp_path {tmp / (kind + '_temp')};"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # Workers run as `nobody` under root by default; pytest's tmp dirs are private to root.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
{user}
worker_processes 1;
pid {tmp / 'nginx.pid'};
error_log {tmp / 'error.log'} info;
events {{ worker_connections 256; }}
http {{
    access_log {tmp / 'access.log'};
{temp_paths}
    include {tmp / 'sglang-gw.conf'};
}}
""")
    return conf


@needs_nginx
def test_nginx_conf_passes_nginx_t(tmp_path):
    conf = _write_nginx(tmp_path, free_port(), free_port(), free_port())
    proc = subprocess.run(["nginx", "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "test is successful" in proc.stderr
    emerg = [line for line in proc.stderr.splitlines() if "[emerg]" in line or "[alert]" in line]
    assert not emerg, proc.stderr


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    """nginx (with the copied sglang-gw.conf) over TLS in front of the slow SSE server."""
    if shutil.which("nginx") is None or shutil.which("openssl") is None:
        pytest.skip("nginx and openssl are not both installed")
    tmp = tmp_path_factory.mktemp("nginx")
    with SlowSSE() as upstream:
        https_port, http_port = free_port(), free_port()
        conf = _write_nginx(tmp, upstream.port, https_port, http_port)
        log = open(tmp / "stderr.log", "wb")
        proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"nginx exited {proc.returncode}: {(tmp / 'stderr.log').read_text()}"
                                f"{(tmp / 'error.log').read_text() if (tmp / 'error.log').exists() else ''}")
                try:
                    socket.create_connection(("127.0.0.1", https_port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "nginx did not start listening"
                    time.sleep(0.05)
            yield {"https": https_port, "http": http_port, "upstream": upstream, "tmp": tmp}
        finally:
            proc.terminate()  # SIGTERM: nginx's fast shutdown, the master stops its worker
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            log.close()


def _https(front) -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the test's self-signed certificate
    return http.client.HTTPSConnection("127.0.0.1", front["https"], context=ctx, timeout=10)


def _stream(conn: http.client.HTTPSConnection, headers: dict) -> tuple[http.client.HTTPResponse, list]:
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json", **headers})
    resp = conn.getresponse()
    events = []  # (arrival time, payload)
    while line := resp.readline():
        event = sse_event(line)
        if event is not None:
            events.append((time.monotonic(), event))
        if event == DONE:
            assert resp.read().strip() == b""  # the blank line ending the event, then EOF
            break
    return resp, events


@needs_nginx
def test_nginx_front_streams_sse_unbuffered_and_forwards_headers(front):
    upstream = front["upstream"]
    conn = _https(front)
    try:
        resp, events = _stream(conn, {"Authorization": "Bearer sk-test"})
        assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
        assert [p["index"] for _, p in events[:-1]] == list(range(EVENTS))
        assert events[-1][1] == DONE

        first = upstream.requests[-1]
        rid = first["headers"]["X-Request-Id"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid), rid  # nginx's $request_id: the client sent none
        assert resp.msg.get_all("X-Request-Id") == [rid]  # exactly once back to the client
        sent = upstream.sent[rid]
        arrived = [t for t, _ in events[:EVENTS]]
        # Each event reached the client before the upstream even began writing the next one: nothing
        # between them holds events back. A buffering proxy delivers them all at the end.
        for i in range(EVENTS - 1):
            assert arrived[i] < sent[i + 1], f"event {i} arrived {arrived[i] - sent[i + 1]:+.3f}s after event " \
                                             f"{i + 1} was sent (arrivals: {[round(t - sent[0], 3) for t in arrived]})"
        assert arrived[-1] - arrived[0] >= (EVENTS - 1) * EVENT_GAP * 0.8

        h = first["headers"]
        assert h["Authorization"] == "Bearer sk-test"
        assert h["X-Forwarded-Proto"] == "https"
        assert h["X-Forwarded-For"] == "127.0.0.1"
        assert first["version"] == (1, 1) and first["keep_alive"], "HTTP/1.1 keep-alive to the upstream"

        # A client's own request id is kept; the second request reuses the upstream connection.
        resp, events = _stream(conn, {"Authorization": "Bearer sk-test", "X-Request-Id": "client-id-1"})
        assert resp.status == 200 and len(events) == EVENTS + 1
        second = upstream.requests[-1]
        assert second["headers"]["X-Request-Id"] == "client-id-1"
        assert resp.msg.get_all("X-Request-Id") == ["client-id-1"]
        assert second["peer"] == first["peer"], "nginx opened a new upstream connection: no keep-alive"
    finally:
        conn.close()


@needs_nginx
def test_nginx_front_redirects_http_and_limits_bodies(front):
    upstream = front["upstream"]
    seen = len(upstream.requests)

    conn = http.client.HTTPConnection("127.0.0.1", front["http"], timeout=10)
    try:
        conn.request("POST", "/v1/completions?x=1", body=b"{}", headers={"Host": "llm.example.com"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status in (301, 302, 307, 308)
        assert resp.getheader("Location") == "https://llm.example.com/v1/completions?x=1"
    finally:
        conn.close()

    conn = _https(front)
    try:
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(GatewaySettings().max_request_bytes + 1))
        conn.endheaders()  # the body is never sent: nginx answers from the headers
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 413
    finally:
        conn.close()
    assert len(upstream.requests) == seen, "these requests must not reach the gateway"

