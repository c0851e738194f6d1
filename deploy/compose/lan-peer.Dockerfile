# A peer on a lab LAN: the servant image's binary on the lab's net base, which has
# iproute2, because a peer must route through its LAN's router rather than Docker's
# gateway. It starts as root only to set that route, then runs servant as uid 10001.
ARG SERVANT_IMAGE=servant:local
ARG NET_IMAGE=servant-base/net:bookworm
FROM ${SERVANT_IMAGE} AS servant

FROM ${NET_IMAGE}
COPY --from=servant /usr/local/bin/servant /usr/local/bin/servant
COPY lan-peer-entrypoint.sh /usr/local/bin/lan-peer-entrypoint.sh
RUN mkdir -p /data && chown 10001:10001 /data && chmod 0700 /data
ENV SERVANT_DATA_DIR=/data \
    SERVANT_API=0.0.0.0:5100
VOLUME ["/data"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["servant", "health"]
ENTRYPOINT ["sh", "/usr/local/bin/lan-peer-entrypoint.sh"]
CMD ["run"]
