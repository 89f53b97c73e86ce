#!/usr/bin/env bash
# Build (only when missing) the Kubernetes binaries and CSI sidecars the e2e needs, from the Go module
# proxy, into a cache keyed by version:
#
#   $CACHE/k8s-<K8S_VERSION>/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubectl,kubelet}
#   $CACHE/sidecars-p<PROV>-s<SNAP>-r<RES>/bin/{csi-provisioner,csi-snapshotter,snapshot-controller,csi-resizer}
#   $CACHE/sidecars-p<PROV>-s<SNAP>-r<RES>/crd/*.yaml      (VolumeSnapshot* CRDs from external-snapshotter client/v8)
#   $CACHE/rootfs-<RELEASE>-<hash of packages>/layer.tar    (the Dockerfile's runtime stage: a minimal Debian
#                                                           root with RUNTIME_PACKAGES, by debootstrap, as an image layer)
#   $CACHE/k8s-e2e-<K8S_VERSION>/bin/{e2e.test,ginkgo,agnhost}
#                                                           (Kubernetes' e2e suite, its runner and test image, for
#                                                           the External Storage run; built when asked: `conformance`)
#
# CACHE defaults to ${CSI_RAWCOW_CACHE:-/var/cache/csi-rawcow}. Each entry is built in a temporary directory
# next to it and renamed into place only when complete, so an interrupted build never leaves a half cache;
# an existing entry is never rebuilt. A lock per entry serialises concurrent callers.
#
# Why scratch modules: k8s.io/kubernetes, external-provisioner and external-snapshotter have replace
# directives in their go.mod (staging / sibling modules), so `go install pkg@version` is refused. A scratch
# module requires them and replaces every staging module by its published tag (recipe: shared research
# k8s-offline, 00-mkmodule.sh, 30-sidecars-build.sh, 40-k8s-build.sh).
#
# Usage: test/e2e/build-k8s.sh [all|k8s|sidecars|rootfs|conformance|env]...   (default: all)
#   env   print K8S_BIN=, SIDECARS_BIN=, CRD_DIR=, ROOTFS_LAYER= for the cache entries (does not build)
# Env:   CSI_RAWCOW_CACHE, K8S_VERSION, PROVISIONER_VERSION, SNAPSHOTTER_VERSION, RESIZER_VERSION,
#        GOBUILD_P (go build -p, default 2). Run it under `nice -n 19` on a shared machine.
# Cold: about 20 min for Kubernetes and 25 min for the sidecars on 2 cores; later runs: instant.
set -euo pipefail

CACHE=${CSI_RAWCOW_CACHE:-/var/cache/csi-rawcow}
K8S_VERSION=${K8S_VERSION:-v1.34.4}
PROVISIONER_VERSION=${PROVISIONER_VERSION:-v6.4.0}   # github.com/kubernetes-csi/external-provisioner/v6
SNAPSHOTTER_VERSION=${SNAPSHOTTER_VERSION:-v8.7.0}   # github.com/kubernetes-csi/external-snapshotter/v8 (+ client/v8)
RESIZER_VERSION=${RESIZER_VERSION:-v2.3.0}           # github.com/kubernetes-csi/external-resizer/v2
# The Dockerfile's runtime stage (same release, same packages; a test checks they agree).
DEBIAN_RELEASE=${DEBIAN_RELEASE:-trixie}
RUNTIME_PACKAGES="e2fsprogs xfsprogs util-linux mount fuse3"
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
P=${GOBUILD_P:-2}

K8S_NAME=k8s-$K8S_VERSION
SIDECARS_NAME=sidecars-p${PROVISIONER_VERSION#v}-s${SNAPSHOTTER_VERSION#v}-r${RESIZER_VERSION#v}
K8S_BINS="kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet"
SIDECAR_BINS="csi-provisioner csi-snapshotter snapshot-controller csi-resizer"
CONFORMANCE_NAME=k8s-e2e-$K8S_VERSION
ROOTFS_NAME=rootfs-$DEBIAN_RELEASE-$(echo "$RUNTIME_PACKAGES" | sha256sum | cut -c1-12)

log() { printf '%s build-k8s: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# complete DIR BIN...: the entry exists and holds every binary, executable, plus its manifest.
complete() {
	local dir=$1; shift
	[ -f "$dir/MANIFEST" ] || return 1
	local b; for b in "$@"; do [ -e "$dir/$b" ] || return 1; done
}

# with_entry NAME BUILDFN BIN...: build cache entry NAME with BUILDFN TMPDIR unless complete.
with_entry() {
	local name=$1 fn=$2; shift 2
	local final=$CACHE/$name
	mkdir -p "$CACHE"
	if complete "$final" "$@"; then log "$name: cached ($final)"; return 0; fi
	exec 9>"$CACHE/.$name.lock"
	if ! flock -n 9; then log "$name: another build holds $CACHE/.$name.lock, waiting"; flock 9; fi
	if complete "$final" "$@"; then log "$name: cached ($final)"; exec 9>&-; return 0; fi
	# we hold the lock: leftovers of interrupted builds and broken entries can go.
	rm -rf "$CACHE/.tmp.$name."*
	if [ -e "$final" ]; then log "$name: incomplete entry, replacing"; rm -rf "$final"; fi
	local tmp; tmp=$(mktemp -d "$CACHE/.tmp.$name.XXXXXX")
	# shellcheck disable=SC2064
	trap "rm -rf '$tmp'" EXIT
	local start=$SECONDS
	log "$name: building in $tmp"
	"$fn" "$tmp"
	complete_bins "$tmp" "$@"
	rm -rf "$tmp/work"
	{
		echo "entry: $name"
		echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - start)) s"
		echo "go: $(go version)"
		(cd "$tmp" && find . -type f ! -name MANIFEST ! -path './work/*' -print0 | sort -z | xargs -0 sha256sum)
	} >"$tmp/MANIFEST"
	chmod 0755 "$tmp"
	mv -T "$tmp" "$final"   # rename(2): the entry appears complete or not at all
	trap - EXIT
	exec 9>&-
	log "$name: done in $((SECONDS - start)) s, $(du -sh "$final" | cut -f1)"
}

complete_bins() {
	local dir=$1; shift
	local b; for b in "$@"; do
		[ -e "$dir/$b" ] || { log "missing $b after build"; exit 1; }
	done
}

# k8s_module WORK PKG...: a scratch module in WORK requiring k8s.io/kubernetes with every staging
# module replaced by its published tag, and a tools.go importing PKG... so that tidy records them.
k8s_module() {
	local work=$1; shift
	local staging=v0.${K8S_VERSION#v1.}   # v1.34.4 -> v0.34.4
	mkdir -p "$work"
	local modfile; modfile=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | jq -r .GoMod)
	{
		echo "module scratch/k8sbuild"
		echo
		echo "go $(sed -n 's/^go //p' "$modfile")"
		echo
		echo "require k8s.io/kubernetes $K8S_VERSION"
		echo
		grep -oE '^\s*k8s.io/[a-z0-9-]+ => ./staging' "$modfile" | awk '{print $1}' |
			while read -r m; do echo "replace $m => $m $staging"; done
	} >"$work/go.mod"
	{
		printf '//go:build tools\n\npackage tools\n\nimport (\n'
		local pkg; for pkg in "$@"; do printf '\t_ "%s"\n' "$pkg"; done
		printf ')\n'
	} >"$work/tools.go"
	(cd "$work" && go mod tidy)
}

# k8s_ldflags: the version stamps of a Kubernetes release build.
k8s_ldflags() {
	local minor; minor=$(echo "$K8S_VERSION" | cut -d. -f2)
	local ldf="-s -w" pkg
	for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		ldf="$ldf -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
		ldf="$ldf -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
	done
	echo "$ldf"
}

build_k8s() {
	local tmp=$1 work=$1/work/kubernetes
	local pkgs="" c; for c in $K8S_BINS; do pkgs="$pkgs k8s.io/kubernetes/cmd/$c"; done
	mkdir -p "$tmp/bin"
	# shellcheck disable=SC2086
	k8s_module "$work" $pkgs
	# static like upstream release builds
	# shellcheck disable=SC2086
	(cd "$work" && CGO_ENABLED=0 go build -p "$P" -trimpath -ldflags "$(k8s_ldflags)" -o "$tmp/bin/" $pkgs)
}

# build_conformance TMP: e2e.test (the External Storage suite lives in it), the ginkgo CLI of the
# same version (it runs e2e.test in parallel processes) and agnhost, the test image most specs
# run. tools.go lists the imports of test/e2e's own _test files, which
# tidy would not record for a package of another module.
build_conformance() {
	local tmp=$1 work=$1/work/e2e
	mkdir -p "$tmp/bin"
	local e=k8s.io/kubernetes/test/e2e
	k8s_module "$work" github.com/onsi/ginkgo/v2 github.com/onsi/ginkgo/v2/ginkgo $e $e/feature $e/apimachinery $e/apps $e/architecture \
		$e/auth $e/autoscaling $e/cloud $e/common $e/dra $e/instrumentation $e/kubectl $e/lifecycle \
		$e/lifecycle/bootstrap $e/network $e/node $e/scheduling $e/storage $e/storage/csimock \
		$e/storage/external $e/windows $e/framework/debug/init $e/framework/metrics/init \
		$e/framework/node/init $e/framework/config $e/framework/testfiles k8s.io/kubernetes/test/utils/format \
		k8s.io/kubernetes/test/images/agnhost
	(cd "$work" && CGO_ENABLED=0 go test -c -p "$P" -trimpath -ldflags "$(k8s_ldflags)" -o "$tmp/bin/e2e.test" $e)
	(cd "$work" && CGO_ENABLED=0 go build -p "$P" -trimpath -ldflags "-s -w" -o "$tmp/bin/" \
		k8s.io/kubernetes/test/images/agnhost github.com/onsi/ginkgo/v2/ginkgo)
}

# scratch_build TMP NAME MODULE VERSION "EXTRA_REQUIRES" PKG=BINARY...
# A scratch module requiring MODULE@VERSION with MODULE's non-local replace directives copied.
scratch_build() {
	local tmp=$1 name=$2 mod=$3 ver=$4 extra=$5; shift 5
	local work=$tmp/work/$name
	mkdir -p "$work" "$tmp/bin"
	local modfile gover
	modfile=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "$mod@$ver" | jq -r .GoMod)
	gover=$(go mod edit -json "$modfile" | jq -r .Go)
	printf 'module scratch/%s\n\ngo %s\n' "$name" "$gover" >"$work/go.mod"
	(
		cd "$work"
		go mod edit -require="$mod@$ver"
		local r; for r in $extra; do go mod edit -require="$r"; done
		go mod edit -json "$modfile" | jq -r '.Replace[]? | select(.New.Version != null) |
			"\(.Old.Path)\(if .Old.Version then "@"+.Old.Version else "" end)=\(.New.Path)@\(.New.Version)"' |
			while read -r rep; do go mod edit -replace="$rep"; done
		{
			printf '//go:build tools\n\npackage tools\n\nimport (\n'
			local pb; for pb in "$@"; do printf '\t_ "%s"\n' "${pb%%=*}"; done
			printf ')\n'
		} >tools.go
		go mod tidy
		for pb in "$@"; do
			CGO_ENABLED=0 go build -p "$P" -trimpath -ldflags="-s -w -X main.version=$ver" -o "$tmp/bin/${pb##*=}" "${pb%%=*}"
		done
	)
}

build_sidecars() {
	local tmp=$1
	local pmajor=${PROVISIONER_VERSION%%.*}
	log "csi-provisioner $PROVISIONER_VERSION"
	scratch_build "$tmp" provisioner "github.com/kubernetes-csi/external-provisioner/$pmajor" "$PROVISIONER_VERSION" "" \
		"github.com/kubernetes-csi/external-provisioner/$pmajor/cmd/csi-provisioner=csi-provisioner"
	log "csi-snapshotter, snapshot-controller $SNAPSHOTTER_VERSION"
	local smajor=${SNAPSHOTTER_VERSION%%.*}
	scratch_build "$tmp" snapshotter "github.com/kubernetes-csi/external-snapshotter/$smajor" "$SNAPSHOTTER_VERSION" \
		"github.com/kubernetes-csi/external-snapshotter/client/$smajor@$SNAPSHOTTER_VERSION" \
		"github.com/kubernetes-csi/external-snapshotter/$smajor/cmd/csi-snapshotter=csi-snapshotter" \
		"github.com/kubernetes-csi/external-snapshotter/$smajor/cmd/snapshot-controller=snapshot-controller"
	# VolumeSnapshot, VolumeSnapshotContent, VolumeSnapshotClass (+ group snapshot) CRDs ship in client/v8.
	local crd
	crd=$(cd "$tmp/work/snapshotter" && go mod download -json "github.com/kubernetes-csi/external-snapshotter/client/$smajor@$SNAPSHOTTER_VERSION" | jq -r .Dir)/config/crd
	mkdir -p "$tmp/crd"
	cp "$crd"/*snapshot.storage.k8s.io_*.yaml "$tmp/crd/"
	chmod 0644 "$tmp/crd/"*.yaml
	log "csi-resizer $RESIZER_VERSION"
	local rmajor=${RESIZER_VERSION%%.*}
	scratch_build "$tmp" resizer "github.com/kubernetes-csi/external-resizer/$rmajor" "$RESIZER_VERSION" "" \
		"github.com/kubernetes-csi/external-resizer/$rmajor/cmd/csi-resizer=csi-resizer"
	ls "$tmp/crd/"*.yaml >/dev/null
}

# build_rootfs TMP: debootstrap a minimal Debian with the runtime packages and tar it as an
# image layer. debootstrap mounts /proc and /sys in the target: it runs in a private mount
# namespace so that nothing stays mounted when it is interrupted.
build_rootfs() {
	local tmp=$1 root=$1/work/root
	command -v debootstrap >/dev/null || { log "debootstrap not found (apt-get install debootstrap)"; exit 1; }
	mkdir -p "$root"
	# shellcheck disable=SC2086
	unshare --mount --propagation private \
		debootstrap --variant=minbase --include="$(echo $RUNTIME_PACKAGES | tr ' ' ,)" \
		"$DEBIAN_RELEASE" "$root" "$DEBIAN_MIRROR" >"$tmp/debootstrap.log" 2>&1 ||
		{ tail -20 "$tmp/debootstrap.log" >&2; log "debootstrap failed"; exit 1; }
	# what the Dockerfile's `rm -rf /var/lib/apt/lists/*` and apt's clean leave out
	rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/debootstrap
	# shellcheck disable=SC2086
	chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' $RUNTIME_PACKAGES >"$tmp/packages"
	tar --sort=name --mtime=@0 --numeric-owner --xattrs -C "$root" \
		--exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' -cf "$tmp/layer.tar" .
}

print_env() {
	echo "K8S_BIN=$CACHE/$K8S_NAME/bin"
	echo "SIDECARS_BIN=$CACHE/$SIDECARS_NAME/bin"
	echo "CRD_DIR=$CACHE/$SIDECARS_NAME/crd"
	echo "ROOTFS_LAYER=$CACHE/$ROOTFS_NAME/layer.tar"
	echo "CONFORMANCE_BIN=$CACHE/$CONFORMANCE_NAME/bin"
}

# main is one function, called on the script's last line with exit: bash has read the whole
# file before anything runs, so editing the script during a (long) build is harmless.
main() {
	command -v go >/dev/null || { log "go not found"; exit 1; }
	command -v jq >/dev/null || { log "jq not found (apt-get install jq)"; exit 1; }
	command -v flock >/dev/null || { log "flock not found (util-linux)"; exit 1; }
	K8S_FILES=$(for b in $K8S_BINS; do printf 'bin/%s ' "$b"; done)
	SIDECAR_FILES="$(for b in $SIDECAR_BINS; do printf 'bin/%s ' "$b"; done)crd"
	# the scratch modules must resolve their own graphs, whatever the caller's GOFLAGS says
	export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod" GOWORK=off

	for what in "${@:-all}"; do
		case $what in
		all)
			with_entry "$K8S_NAME" build_k8s $K8S_FILES
			with_entry "$SIDECARS_NAME" build_sidecars $SIDECAR_FILES
			with_entry "$ROOTFS_NAME" build_rootfs layer.tar packages
			;;
		k8s) with_entry "$K8S_NAME" build_k8s $K8S_FILES ;;
		sidecars) with_entry "$SIDECARS_NAME" build_sidecars $SIDECAR_FILES ;;
		rootfs) with_entry "$ROOTFS_NAME" build_rootfs layer.tar packages ;;
		conformance) with_entry "$CONFORMANCE_NAME" build_conformance bin/e2e.test bin/agnhost bin/ginkgo ;;
		env) print_env; continue ;;
		*) log "unknown target $what (all|k8s|sidecars|rootfs|conformance|env)"; exit 2 ;;
		esac
	done
	[ "$*" = env ] || print_env
}

main "$@"; exit
