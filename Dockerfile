# tdproxy container image.
#
#   docker build -t tdproxy .
#   docker run -d -p 8080:8080 -v "$PWD/config:/etc/tdproxy:ro" tdproxy
#
# Mount the config DIRECTORY at /etc/tdproxy (not the single file): editors and ConfigMaps replace
# the file, and a bind-mounted file would keep pointing at the old one. tdproxy polls the file and
# applies new weights without a restart. `docker stop` sends SIGTERM straight to tdproxy (exec
# form, no shell in between): it drains in-flight requests and exits 0.
#
# BASE_IMAGE: any image with python3 (>= 3.11) and its venv module. Where Docker Hub is out of
# reach, scripts/container-base builds one from Debian packages (localhost/tdproxy-base:bookworm).
ARG BASE_IMAGE=python:3.12-slim

# ---- build: a virtual environment with tdproxy and its dependencies -------------------------------
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Optional pip settings for builds behind a mirror or a TLS-intercepting proxy, e.g.
#   --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt -v /etc/ssl/certs:/etc/ssl/certs:ro
# Build arguments only, they do not reach the final image; pip ignores the empty defaults.
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_CERT=
ARG PIP_TRUSTED_HOST=
WORKDIR /src
RUN python3 -m venv /opt/tdproxy
# Dependencies first, in their own layer: it stays cached while only the source changes.
COPY pyproject.toml ./
RUN /opt/tdproxy/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && /opt/tdproxy/bin/pip install --no-cache-dir --requirement /tmp/requirements.txt
# TDPROXY_COMPILE: the hot path compiled with mypyc (same source, a fifth less CPU per
# request, see benchmarks/RESULTS.md). auto (the default): when the build image has a C compiler
# and Python's headers; 1: always (fails without them); 0: never. The compiled package keeps the
# pure-Python files, and mypy is removed again after the build.
ARG TDPROXY_COMPILE=auto
COPY README.md setup.py ./
COPY tdproxy ./tdproxy
RUN compile="$TDPROXY_COMPILE"; \
    if [ "$compile" = auto ]; then \
      compile=0; \
      if command -v cc >/dev/null 2>&1 && /opt/tdproxy/bin/python -c "import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"; then compile=1; fi; \
    fi; \
    if [ "$compile" = 1 ]; then \
      /opt/tdproxy/bin/pip install --no-cache-dir "mypy>=1.10" "setuptools>=68" "wheel>=0.40" \
      && TDPROXY_COMPILE=1 /opt/tdproxy/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src \
      && /opt/tdproxy/bin/pip uninstall --yes mypy; \
    else \
      /opt/tdproxy/bin/pip install --no-cache-dir --no-deps /src; \
    fi \
    && /opt/tdproxy/bin/tdproxy --version

# ---- runtime: the same base, the venv, a non-root user --------------------------------------------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="tdproxy" \
      org.opencontainers.image.description="Traffic Distributor: a weighted HTTP reverse proxy" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 tdproxy \
    && useradd --uid 10001 --gid tdproxy --no-log-init --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin tdproxy
COPY --from=build /opt/tdproxy /opt/tdproxy
# The default config (example backends): replace it by mounting a directory at /etc/tdproxy.
COPY config/tdproxy.yaml /etc/tdproxy/tdproxy.yaml
ENV PATH=/opt/tdproxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TDPROXY_CONFIG=/etc/tdproxy/tdproxy.yaml
USER 10001:10001
# 8080: the entrypoint; 9901: admin (metrics, /healthz, /readyz, status). The admin server
# listens where admin.address says (127.0.0.1 by default): set 0.0.0.0 to reach it from outside.
EXPOSE 8080 9901
# Liveness of the process, from inside the container, with the venv's python (no curl needed).
# It reads admin.address/admin.port from the config so a moved admin port keeps working.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/opt/tdproxy/bin/python", "-c", "import os, urllib.request, yaml; a = ((yaml.safe_load(open(os.environ['TDPROXY_CONFIG'])) or {}).get('admin') or {}); h = str(a.get('address') or '127.0.0.1'); h = {'0.0.0.0': '127.0.0.1', '::': '::1'}.get(h, h); h = '[' + h + ']' if ':' in h else h; urllib.request.urlopen('http://%s:%s/healthz' % (h, a.get('port') or 9901), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/tdproxy/bin/tdproxy"]
CMD ["run"]
