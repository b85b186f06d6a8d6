# One image for every stage: `usher worker <stage>` picks the stage.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 USHER_DATA_DIR=/var/lib/usher USHER_OUTBOX_DIR=/var/lib/usher/outbox \
    USHER_SCHEMAS_DIR=/app/schemas USHER_LAYOUTS_DIR=/app/layouts
WORKDIR /app
COPY pyproject.toml README.md ./
COPY workers ./workers
COPY schemas ./schemas
COPY layouts ./layouts
RUN pip install --no-cache-dir . && useradd --system --home /var/lib/usher usher \
    && mkdir -p /var/lib/usher && chown usher /var/lib/usher
USER usher
ENTRYPOINT ["usher"]
CMD ["--help"]
