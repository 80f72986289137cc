# sortscp: a DICOM Storage SCP that files every instance it receives.
#
#   docker build -t sortscp .
#   docker run -d --name sortscp -p 11112:11112 -v /srv/dicom:/data sortscp
#
# Configuration: the SORTSCP_* environment variables (see README.md), e.g.
#   -e SORTSCP_AET=PACS_IN -e SORTSCP_WORKERS=4 -e SORTSCP_LOG_FORMAT=json
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install the package from the build context; `python -m pip` works whether
# Python lives in /usr/local or in a virtual environment first on PATH.
COPY pyproject.toml README.md /src/
COPY scp /src/scp
RUN python -m pip install /src \
    && rm -rf /src \
    && sortscp --version

# An unprivileged user owns the output folder; the mounted folder must be
# writable by uid 10001 (or run with --user of the folder's owner).
RUN useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /data --shell /usr/sbin/nologin sortscp \
    && mkdir -p /data \
    && chown sortscp:sortscp /data

ENV SORTSCP_OUT=/data \
    SORTSCP_HOST=0.0.0.0 \
    SORTSCP_PORT=11112 \
    SORTSCP_AET=SORTSCP

VOLUME ["/data"]
EXPOSE 11112
USER sortscp
WORKDIR /data

# A real C-ECHO to ourselves: healthy only if the SCP answers Success.
HEALTHCHECK --interval=30s --timeout=15s --start-period=20s --retries=3 \
    CMD sortscp echo 127.0.0.1 "$SORTSCP_PORT" --called-aet "$SORTSCP_AET" --timeout 10

# `docker stop` sends SIGTERM to sortscp itself (exec form, no shell in
# between): it stops accepting, lets associations in flight finish
# (SORTSCP_DRAIN_TIMEOUT, default 30 s; give `docker stop -t` more than that),
# closes the worker pool and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sortscp"]
CMD ["serve"]
