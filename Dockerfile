# syntax=docker/dockerfile:1
# csi-rawcow: one static binary (driver, serve, registrar, image, attach/detach) on a Debian
# runtime carrying exactly the tools the node plugin runs: mount-utils' SafeFormatAndMount
# and ResizeFs call mkfs.ext4, fsck.ext4, dumpe2fs, resize2fs (e2fsprogs), mkfs.xfs,
# xfs_repair, xfs_io, xfs_growfs (xfsprogs), blkid, fsck, blockdev (util-linux), mount,
# umount (mount); fuse3 brings /etc/fuse.conf and fusermount3 for FUSE outside DirectMount.
#
#   docker build -t ghcr.io/rawcow/csi-rawcow:$(git describe --always) \
#     --build-arg VERSION=$(git describe --always --dirty) .
#
# The node plugin runs privileged as root (FUSE, loop devices, mounts); the image keeps root as
# its user for that. `csi-rawcow image import` of qcow2 files needs qemu-img, which is not here:
# import raw images, or convert them first.

ARG GO_VERSION=1.26
ARG DEBIAN_RELEASE=trixie

FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-${DEBIAN_RELEASE} AS build
ARG TARGETOS=linux
ARG TARGETARCH
ARG VERSION=dev
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY cmd ./cmd
COPY pkg ./pkg
COPY internal ./internal
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -buildvcs=false -ldflags="-s -w -X main.version=${VERSION}" \
      -o /out/csi-rawcow ./cmd/csi-rawcow

FROM debian:${DEBIAN_RELEASE}-slim
ARG VERSION=dev
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      e2fsprogs xfsprogs util-linux mount fuse3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/csi-rawcow /usr/local/bin/csi-rawcow
LABEL org.opencontainers.image.title="csi-rawcow" \
      org.opencontainers.image.description="CSI driver: node-local copy-on-write raw volumes" \
      org.opencontainers.image.source="https://github.com/rawcow/csi-rawcow" \
      org.opencontainers.image.version="${VERSION}"
ENTRYPOINT ["/usr/local/bin/csi-rawcow"]
CMD ["driver"]
