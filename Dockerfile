# syntax=docker/dockerfile:1
# The agent-sidecar image: the `sidecar` package in a venv on a pinned slim
# Python, run as a non-root user. deploy/k8s uses it for the sidecar, the
# approvers' console and the demo agent (the policy bundle is a ConfigMap
# that OPA's own image serves).
#
#   docker build -t registry.example.com/platform/agent-sidecar:0.1.0 .
#
# The base is pinned by exact tag; pin it by digest too in your registry's
# mirror (docker buildx imagetools inspect python:3.11.13-slim-bookworm).

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN python -m venv /opt/agent-sidecar \
 && /opt/agent-sidecar/bin/pip install . \
 && /opt/agent-sidecar/bin/agent-sidecar --help > /dev/null

FROM python:3.11.13-slim-bookworm
RUN groupadd --system --gid 65532 sidecar \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin sidecar
COPY --from=build /opt/agent-sidecar /opt/agent-sidecar
ENV PATH=/opt/agent-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 50051
ENTRYPOINT ["agent-sidecar"]
CMD ["serve", "--config", "/etc/agent-sidecar/sidecar.yaml"]
