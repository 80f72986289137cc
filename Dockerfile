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
# writable by uid 10001 (or run with --user of the folder's owner). Its group is
# 10001 too, as the README's `chown 10001:10001` says (a system group's id would
# give the host's files to whatever group has it there).
RUN groupadd --system --gid 10001 sortscp \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /data --shell /usr/sbin/nologin sortscp \
    && mkdir -p /data \
    && chown sortscp:sortscp /data

# The drain on stop is shorter than `docker stop`'s default 10 s grace period,
# so a stop always ends with exit 0, not SIGKILL; raise both together
# (`-e SORTSCP_DRAIN_TIMEOUT=60` with `docker stop -t 70`) for long transfers.
ENV SORTSCP_OUT=/data \
    SORTSCP_HOST=0.0.0.0 \
    SORTSCP_PORT=11112 \
    SORTSCP_AET=SORTSCP \
    SORTSCP_DRAIN_TIMEOUT=8

VOLUME ["/data"]
# 11112: DICOM. 9112: Prometheus metrics, off unless -e SORTSCP_METRICS_PORT=9112 (README
# "Events, hooks and metrics").
EXPOSE 11112 9112
USER sortscp
WORKDIR /data

# A real C-ECHO to ourselves: healthy only if the SCP answers Success (a C-ECHO
# alone is let in past SORTSCP_MAX_ASSOCIATIONS, so a server full of senders
# stays healthy). With SORTSCP_ALLOW_AET, list HEALTHCHECK@127.0.0.1 too; with
# TLS, run with --no-healthcheck (sortscp echo speaks plain DICOM).
HEALTHCHECK --interval=30s --timeout=15s --start-period=20s --retries=3 \
    CMD sortscp echo 127.0.0.1 "$SORTSCP_PORT" --called-aet "$SORTSCP_AET" --aet HEALTHCHECK --timeout 10

# `docker stop` sends SIGTERM to sortscp itself (exec form, no shell in
# between): it stops accepting, lets associations in flight finish
# (SORTSCP_DRAIN_TIMEOUT), closes the worker pool and exits 0. Python installs
# its own SIGTERM/SIGINT handlers, so it needs no init as PID 1; `--init` is
# fine too.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sortscp"]
CMD ["serve"]
