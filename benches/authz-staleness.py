#!/usr/bin/env python3
"""How long after `rotator revoke` (another process than the daemon) the
webhook refuses the certificate: the figure the docs promise ("within
authz.refresh_interval").

  benches/authz-staleness.py [ROUNDS]          # default 30
  ROTATOR=target/release/rotator REFRESH=1s benches/authz-staleness.py 30

One `rotator serve --authz-addr` on SQLite (local CA); each round adds a user,
waits until the webhook knows its certificate (no opinion), runs `rotator
revoke USER` and asks the webhook about that certificate over one kept-alive
mutual-TLS connection every 2 ms until it answers denied. Prints the time from
the revoke command's exit (its commit is before it) and from its start (an
upper bound), as a table. Needs openssl. Asserts nothing.
"""
import base64
import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROTATOR = os.path.abspath(os.environ.get("ROTATOR", os.path.join(ROOT, "target/debug/rotator")))
REFRESH = os.environ.get("REFRESH", "1s")


def sh(*args, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}
    return subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_identity(d):
    """A CA and the API server's client certificate signed by it."""
    for args in (
        ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=bench apiserver CA"],
        ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=kube-apiserver"],
    ):
        sh("openssl", *args, cwd=d)
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("extendedKeyUsage = clientAuth\nbasicConstraints = CA:FALSE\n")
    sh("openssl", "x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
       "-CAcreateserial", "-days", "1", "-out", "client.crt", "-extfile", "ext.cnf", cwd=d)


def presented(d, kubeconfig):
    """The certificate's SHA-256 and its subject's O values (groups)."""
    text = open(os.path.join(d, kubeconfig)).read()
    # A folded YAML scalar (`>-` and indented lines) up to the next key.
    raw = text.split("client-certificate-data:")[1].split("client-key-data:")[0]
    b64 = "".join(w for w in raw.split() if w not in (">-", "|", ">"))
    pem = base64.b64decode(b64).decode()
    # The first block is the client certificate (a chain may follow).
    pem = pem[pem.index("-----BEGIN CERTIFICATE-----"):]
    pem = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")] + "\n"
    der = ssl.PEM_cert_to_DER_cert(pem)
    path = os.path.join(d, "cert.pem")
    with open(path, "w") as f:
        f.write(pem)
    subj = sh("openssl", "x509", "-in", path, "-noout", "-subject", "-nameopt", "RFC2253", cwd=d)
    groups = [p[2:] for p in subj.strip().removeprefix("subject=").split(",") if p.startswith("O=")]
    return hashlib.sha256(der).hexdigest(), groups


class Webhook:
    def __init__(self, d, port):
        ctx = ssl.create_default_context(cafile=os.path.join(d, "rotator-data/ca/ca.crt"))
        ctx.load_cert_chain(os.path.join(d, "client.crt"), os.path.join(d, "client.key"))
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)

    def denied(self, user, groups, fp):
        body = json.dumps({
            "kind": "SubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
            "spec": {"user": user, "groups": groups + ["system:authenticated"],
                     "resourceAttributes": {"namespace": "team-a", "verb": "get", "resource": "pods"},
                     "extra": {"authentication.kubernetes.io/credential-id": [f"X509SHA256={fp}"]}},
        })
        self.conn.request("POST", "/v1/authorize", body, {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        v = json.loads(r.read())
        if r.status != 200:
            raise RuntimeError(f"webhook answered {r.status}: {v}")
        return v["status"].get("denied", False)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    d = tempfile.mkdtemp(prefix="authz-staleness-")
    client_identity(d)
    port = free_port()
    with open(os.path.join(d, "rotator.toml"), "w") as f:
        f.write(f'data_dir = "rotator-data"\n[authz]\nclient_ca_file = "ca.crt"\nrefresh_interval = "{REFRESH}"\n')
    sh(ROTATOR, "--config", "rotator.toml", "init", cwd=d)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}
    log = open(os.path.join(d, "serve.log"), "w")
    daemon = subprocess.Popen(
        [ROTATOR, "--config", "rotator.toml", "serve", "--authz-addr", f"127.0.0.1:{port}",
         "--metrics-addr", f"127.0.0.1:{free_port()}"],
        cwd=d, env=env, stderr=log)
    try:
        deadline = time.time() + 30
        while True:
            try:
                hook = Webhook(d, port)
                hook.denied("nobody", [], "0" * 64)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        from_exit, from_start = [], []
        for i in range(ROUNDS):
            user = f"u{i}"
            sh(ROTATOR, "--config", "rotator.toml", "add-user", user, "--group", "dev", "-n", "team-a",
               "--role", "edit", "--out", f"{user}.kubeconfig", cwd=d)
            fp, groups = presented(d, f"{user}.kubeconfig")
            while hook.denied(user, groups, fp):
                time.sleep(0.01)
            # Start at a random point of the refresh cycle, as a real revoke does.
            time.sleep((i * 0.37) % 1.0)
            t0 = time.monotonic()
            sh(ROTATOR, "--config", "rotator.toml", "revoke", user, cwd=d)
            t1 = time.monotonic()
            while not hook.denied(user, groups, fp):
                time.sleep(0.002)
            t2 = time.monotonic()
            from_exit.append((t2 - t1) * 1000)
            from_start.append((t2 - t0) * 1000)
        print(f"\nrotator: {ROTATOR}\nauthz.refresh_interval = {REFRESH}, {ROUNDS} revokes, SQLite, "
              f"load average {os.getloadavg()[0]:.1f}\n")
        print("| measured from | min | median | p90 | max |")
        print("|---|---|---|---|---|")
        for name, xs in (("`rotator revoke` exit (after its commit)", from_exit),
                         ("`rotator revoke` start (upper bound)", from_start)):
            print(f"| {name} | {min(xs):.0f} ms | {statistics.median(xs):.0f} ms | "
                  f"{pct(xs, 90):.0f} ms | {max(xs):.0f} ms |")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=40)


if __name__ == "__main__":
    main()
