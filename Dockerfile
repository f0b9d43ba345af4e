# syntax=docker/dockerfile:1
# One image for every service: `postmesh serve <service>` picks what a container hosts.

FROM python:3.11-slim AS build
WORKDIR /src
COPY requirements.lock pyproject.toml ./
RUN python -m venv /opt/postmesh \
 && /opt/postmesh/bin/pip install --no-cache-dir -r requirements.lock
COPY proto proto
COPY postmesh postmesh
COPY services services
COPY README.md ./
# Generate the protobuf code, then install postmesh itself (its dependencies are pinned above).
RUN /opt/postmesh/bin/pip install --no-cache-dir grpcio-tools mypy-protobuf \
 && /opt/postmesh/bin/python -m postmesh.codegen \
 && /opt/postmesh/bin/pip install --no-cache-dir --no-deps . \
 && /opt/postmesh/bin/pip uninstall -y grpcio-tools mypy-protobuf

FROM python:3.11-slim
RUN groupadd --gid 10001 postmesh && useradd --uid 10001 --gid postmesh --no-create-home postmesh
COPY --from=build /opt/postmesh /opt/postmesh
ENV PATH=/opt/postmesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GRPC_LISTEN=0.0.0.0:50051 \
    DATA_DIR=/var/lib/postmesh
USER 10001:10001
# gRPC, metrics, and SMTP submission when SMTP_STARTTLS_LISTEN / SMTP_TLS_LISTEN are set (unprivileged ports).
EXPOSE 50051 9464 2587 2465
ENTRYPOINT ["postmesh"]
CMD ["serve", "all"]
