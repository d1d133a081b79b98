"""Gateway → sidecar through real Envoys: mTLS versus plaintext, in one run.

Three Envoys (``--concurrency 1`` each): a gateway, a sidecar and an "app" that answers
with ``direct_response`` (so no Python upstream is measured). The TLS variant uses what
meshward's translator configures: HTTPS at the gateway (server certificate from the
mesh CA), and gateway → sidecar mTLS with SPIFFE X.509-SVIDs issued by
``meshward.pki``, the sidecar requiring a client certificate of the trust domain and
the gateway verifying the sidecar's exact SPIFFE ID. The plaintext variant is the same
path with every transport socket removed. No ext_authz in either: this isolates the
cost of the transport. Load comes from ``wrk`` (Debian package ``wrk``) over
keep-alive connections, so handshakes are amortised as they are for real clients
with connection reuse.

Prints req/s and p50/p99 for each variant (alternating rounds) and the ratio
mTLS/plaintext.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshward.envoy_binary import find_envoy
from meshward.pki import CertificateAuthority

TRUST_DOMAIN = "bench.meshward.local"
SVC_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/svc"
EDGE_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/edge"
CIPHERS = (
    "[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]",
    "[ECDHE-RSA-AES128-GCM-SHA256|ECDHE-RSA-CHACHA20-POLY1305]",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tls_params() -> str:
    ciphers = ", ".join(f'"{c}"' for c in CIPHERS)
    return (
        "tls_params: { tls_minimum_protocol_version: TLSv1_2, "
        f"tls_maximum_protocol_version: TLSv1_3, cipher_suites: [{ciphers}] }}"
    )


def _admin(port: int) -> str:
    return (
        f"admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}"
    )


def _hcm(stat: str, route: str) -> str:
    return f"""
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
              stat_prefix: {stat}
              codec_type: AUTO
              route_config: {{ virtual_hosts: [{{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: "/" }}, {route} }}] }}] }}
              http_filters:
                - name: envoy.filters.http.router
                  typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}"""


def _cluster(name: str, port: int, tls: str = "") -> str:
    return f"""
    - name: {name}
      type: STATIC
      connect_timeout: 1s
      load_assignment: {{ cluster_name: {name}, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }}] }}] }}{tls}"""


def configs(files: dict[str, Path], ports: dict[str, int], tls: bool) -> dict[str, str]:
    """Bootstrap YAML for app, sidecar and gateway; with or without TLS."""
    app = f"""{_admin(ports["app_admin"])}
static_resources:
  listeners:
    - name: app
      address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ports["app"]} }} }}
      filter_chains:
        - filters:{_hcm("app", 'direct_response: { status: 200, body: { inline_string: "ok" } }')}
"""
    sidecar_tls = gateway_listener_tls = gateway_cluster_tls = ""
    if tls:
        sidecar_tls = f"""
          transport_socket:
            name: envoy.transport_sockets.tls
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
              require_client_certificate: true
              common_tls_context:
                {_tls_params()}
                tls_certificates: [{{ certificate_chain: {{ filename: "{files["svc_chain"]}" }}, private_key: {{ filename: "{files["svc_key"]}" }} }}]
                validation_context:
                  trusted_ca: {{ filename: "{files["bundle"]}" }}
                  match_typed_subject_alt_names: [{{ san_type: URI, matcher: {{ prefix: "spiffe://{TRUST_DOMAIN}/" }} }}]"""
        gateway_listener_tls = f"""
          transport_socket:
            name: envoy.transport_sockets.tls
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
              common_tls_context:
                {_tls_params()}
                alpn_protocols: [h2, http/1.1]
                tls_certificates: [{{ certificate_chain: {{ filename: "{files["server_chain"]}" }}, private_key: {{ filename: "{files["server_key"]}" }} }}]"""
        gateway_cluster_tls = f"""
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          common_tls_context:
            {_tls_params()}
            tls_certificates: [{{ certificate_chain: {{ filename: "{files["edge_chain"]}" }}, private_key: {{ filename: "{files["edge_key"]}" }} }}]
            validation_context:
              trusted_ca: {{ filename: "{files["bundle"]}" }}
              match_typed_subject_alt_names: [{{ san_type: URI, matcher: {{ exact: "{SVC_ID}" }} }}]"""
    sidecar = f"""{_admin(ports["sidecar_admin"])}
static_resources:
  listeners:
    - name: inbound
      address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ports["sidecar"]} }} }}
      filter_chains:
        - filters:{_hcm("sidecar", "route: { cluster: app }")}{sidecar_tls}
  clusters:{_cluster("app", ports["app"])}
"""
    gateway = f"""{_admin(ports["gateway_admin"])}
static_resources:
  listeners:
    - name: edge
      address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ports["gateway"]} }} }}
      filter_chains:
        - filters:{_hcm("edge", "route: { cluster: svc }")}{gateway_listener_tls}
  clusters:{_cluster("svc", ports["sidecar"], gateway_cluster_tls)}
"""
    return {"app": app, "sidecar": sidecar, "gateway": gateway}


def write_credentials(directory: Path) -> dict[str, Path]:
    ca = CertificateAuthority.load_or_create(directory / "ca", TRUST_DOMAIN)
    files: dict[str, Path] = {"bundle": directory / "bundle.pem"}
    files["bundle"].write_bytes(ca.bundle_pem)
    issued = {
        "svc": ca.issue_svid(SVC_ID, timedelta(hours=1)),
        "edge": ca.issue_svid(EDGE_ID, timedelta(hours=1)),
        "server": ca.issue_server(["localhost"], timedelta(hours=1)),
    }
    for name, cert in issued.items():
        files[f"{name}_chain"] = directory / f"{name}.chain.pem"
        files[f"{name}_key"] = directory / f"{name}.key.pem"
        files[f"{name}_chain"].write_bytes(cert.chain_pem)
        fd = os.open(files[f"{name}_key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert.key_pem)
    return files


class Envoys:
    def __init__(self, directory: Path, texts: dict[str, str], ports: dict[str, int]) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports = ports
        envoy = find_envoy()
        for name in ("app", "sidecar", "gateway"):
            path = directory / f"{name}.yaml"
            path.write_text(texts[name])
            log = (directory / f"{name}.log").open("wb")
            self.procs.append(subprocess.Popen(
                [envoy, "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
                 "--log-level", "error"],
                stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip
        for name in ("app", "sidecar", "gateway"):
            self._wait_live(ports[f"{name}_admin"], directory / f"{name}.log")

    @staticmethod
    def _wait_live(admin: int, log: Path) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                    if r.read().strip() == b"LIVE":
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"envoy did not become LIVE; see {log}:\n{log.read_text()[-2000:]}")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def sidecar_handshakes(ports: dict[str, int]) -> int:
    """TLS handshakes the sidecar's listener completed (proves which variant ran)."""
    url = f"http://127.0.0.1:{ports['sidecar_admin']}/stats?filter=ssl.handshake$"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if "listener." in line)


def wrk(url: str, seconds: float, connections: int) -> tuple[float, float, float]:
    """(req/s, p50 ms, p99 ms) from one wrk run."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url],
        capture_output=True, text=True, check=True, timeout=seconds + 30,
    ).stdout  # fmt: skip
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        raise SystemExit(f"wrk saw {non2xx.group(1)} error responses from {url}:\n{out}")

    def pct(label: str) -> float:
        m = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)\b", out)
        assert m, out
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return rate, pct("50"), pct("99")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per variant")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench/mtls_bench.py needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="meshward-mtls-bench-"))
    try:
        files = write_credentials(work)
        results: dict[str, list[tuple[float, float, float]]] = {"plaintext": [], "mtls": []}
        print(f"# gateway -> sidecar -> direct_response app, 3 Envoys --concurrency 1, "
              f"wrk -t1 -c{args.connections} {args.seconds:g}s keep-alive, cpus {os.cpu_count()},"
              f" load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
        for _ in range(args.rounds):
            for variant in ("plaintext", "mtls"):
                ports = {k: free_port() for k in ("app", "sidecar", "gateway", "app_admin",
                                                  "sidecar_admin", "gateway_admin")}  # fmt: skip
                tls = variant == "mtls"
                run_dir = work / f"{variant}-{len(results[variant])}"
                run_dir.mkdir()
                envoys = Envoys(run_dir, configs(files, ports, tls), ports)
                try:
                    scheme = "https://localhost" if tls else "http://127.0.0.1"
                    url = f"{scheme}:{ports['gateway']}/"
                    wrk(url, 1.0, args.connections)  # warm-up: connections, TLS sessions
                    results[variant].append(wrk(url, args.seconds, args.connections))
                    handshakes = sidecar_handshakes(ports)
                    if (handshakes > 0) != tls:
                        raise SystemExit(f"{variant}: sidecar saw {handshakes} TLS handshakes")
                finally:
                    envoys.stop()
        print(f"{'variant':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}   (median of rounds)")
        summary = {}
        for variant, runs in results.items():
            rate = statistics.median(r[0] for r in runs)
            p50 = statistics.median(r[1] for r in runs)
            p99 = statistics.median(r[2] for r in runs)
            summary[variant] = (rate, p50, p99)
            print(f"{variant:<10} {rate:>9.0f} {p50:>8.2f} {p99:>8.2f}")
        (pr, _, pp99), (mr, _, mp99) = summary["plaintext"], summary["mtls"]
        print(f"throughput ratio mtls/plaintext: {mr / pr:.2f}")
        print(f"p99 ratio mtls/plaintext: {mp99 / pp99:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
