# ollama-mirror as a container: the cache is a volume, the process runs unprivileged.
FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /var/cache/ollama-mirror --create-home mirror
WORKDIR /opt/ollama-mirror
COPY pyproject.toml README.md ./
COPY mirror ./mirror
RUN pip install --no-cache-dir . && rm -rf /root/.cache

ENV OLLAMA_MIRROR_LISTEN=0.0.0.0:11435 \
    OLLAMA_MIRROR_CACHE_DIR=/var/cache/ollama-mirror
VOLUME ["/var/cache/ollama-mirror"]
# 11435: the registry (and the status page, /metrics, /healthz). For transparent mode add
# OLLAMA_MIRROR_PROXY_LISTEN=0.0.0.0:3128 and publish 3128; the CA lives in the volume.
EXPOSE 11435 3128
USER mirror
# /healthz answers 200 whatever the access settings (allow_clients, tokens, keys) and says
# nothing else; the port is the listener's, from OLLAMA_MIRROR_LISTEN.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD python -c "import os, urllib.request; port = os.environ.get('OLLAMA_MIRROR_LISTEN', ':11435').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"
ENTRYPOINT ["ollama-mirror"]
CMD ["serve"]
