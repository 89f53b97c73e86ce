#!/usr/bin/env bash
# Installs what csi-rawcow and its tests call on a fresh Debian machine (as root): the file
# system tools, fio and qemu-img for the engine and presentation tests, and for the e2e on
# real Kubernetes components etcd, containerd, runc, CNI plugins, busybox (test pods),
# debootstrap (the driver image's root) and jq (build-k8s.sh).
set -euo pipefail
need=()
for tool in mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs losetup:util-linux fio:fio qemu-img:qemu-utils \
	fusermount3:fuse3 etcd:etcd-server containerd:containerd runc:runc /usr/lib/cni/host-local:containernetworking-plugins \
	busybox:busybox-static debootstrap:debootstrap jq:jq iptables:iptables; do
	command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq "${need[@]}" >/dev/null
fi
modprobe loop 2>/dev/null || true
modprobe fuse 2>/dev/null || true
