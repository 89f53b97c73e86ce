//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The node: Debian's containerd and runc with a private root, state and socket, and a kubelet
// from the cache registered as nodeName. Two workarounds for this kind of machine (learned in
// the shared research): the process has no CAP_SYS_RESOURCE, so runc cannot set the negative
// oom_score_adj kubelet asks for (a wrapper clamps it to 0); and pods get an isolated network
// namespace (a tiny CNI plugin) so that nothing is added to the host's network.

const kubeletRoot = "/var/lib/kubelet" // the manifests' host paths point here

const runcWrapper = `#!/bin/sh
# runc, with negative oomScoreAdj clamped to 0 (no CAP_SYS_RESOURCE here)
bundle=""
prev=""
for a in "$@"; do
  case "$prev" in --bundle|-b) bundle=$a ;; esac
  case "$a" in --bundle=*) bundle=${a#--bundle=} ;; esac
  prev=$a
done
if [ -n "$bundle" ] && [ -f "$bundle/config.json" ]; then
  jq -c 'if (.process.oomScoreAdj // 0) < 0 then .process.oomScoreAdj = 0 else . end' "$bundle/config.json" > "$bundle/config.json.tmp" &&
    mv "$bundle/config.json.tmp" "$bundle/config.json"
fi
exec runc "$@"
`

const cniIsolated = `#!/bin/bash
# CNI plugin: a veth pair kept inside the pod's network namespace (both ends), address from
# host-local; nothing is added to the host's namespace.
set -euo pipefail
conf=$(cat)
ipam() { CNI_COMMAND=$1 "$(dirname "$0")/host-local" <<<"$conf"; }
case "$CNI_COMMAND" in
ADD)
  res=$(ipam ADD)
  ip=$(jq -r '.ips[0].address' <<<"$res")
  nsenter --net="$CNI_NETNS" sh -c "ip link add $CNI_IFNAME type veth peer name ${CNI_IFNAME}p && ip link set ${CNI_IFNAME}p up && ip addr add $ip dev $CNI_IFNAME && ip link set $CNI_IFNAME up && ip link set lo up"
  mac=$(nsenter --net="$CNI_NETNS" cat "/sys/class/net/$CNI_IFNAME/address")
  jq --arg ifn "$CNI_IFNAME" --arg mac "$mac" --arg ns "$CNI_NETNS" \
    '.interfaces=[{name:$ifn, mac:$mac, sandbox:$ns}] | .ips[0].interface=0 | del(.routes)' <<<"$res" ;;
DEL)
  ipam DEL >/dev/null 2>&1 || true
  if [ -n "${CNI_NETNS:-}" ] && [ -e "$CNI_NETNS" ]; then nsenter --net="$CNI_NETNS" ip link del "$CNI_IFNAME" 2>/dev/null || true; fi ;;
CHECK) ;;
VERSION) echo '{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0"]}' ;;
esac
`

type node struct {
	work     string // WORK/node
	ctrdDir  string
	socket   string
	procs    *procs
	kubelet  *proc
	ctrd     *proc
	logsDir  string
	pauseImg string
}

const pauseImage = "registry.k8s.io/pause:3.10"

func startContainerd(work string, ps *procs) (*node, error) {
	n := &node{work: filepath.Join(work, "node"), procs: ps, pauseImg: pauseImage}
	n.ctrdDir = filepath.Join(n.work, "containerd")
	n.socket = filepath.Join(n.ctrdDir, "containerd.sock")
	for _, tool := range []string{"containerd", "runc", "ctr", "nsenter", "ip", "jq"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s not found (apt-get install containerd runc containernetworking-plugins jq): %w", tool, err)
		}
	}
	if _, err := os.Stat("/usr/lib/cni/host-local"); err != nil {
		return nil, fmt.Errorf("CNI plugins missing (apt-get install containernetworking-plugins): %w", err)
	}
	cniBin := filepath.Join(n.ctrdDir, "cni-bin")
	cniConf := filepath.Join(n.ctrdDir, "cni-conf")
	for _, d := range []string{cniBin, cniConf, filepath.Join(n.ctrdDir, "root"), filepath.Join(n.ctrdDir, "state")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	for _, f := range []string{"host-local", "loopback"} {
		if b, err := exec.Command("cp", "/usr/lib/cni/"+f, cniBin).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("cp %s: %v: %s", f, err, b)
		}
	}
	files := map[string]string{
		filepath.Join(cniBin, "e2e-isolated"):    cniIsolated,
		filepath.Join(n.ctrdDir, "runc-wrapper"): runcWrapper,
		filepath.Join(cniConf, "10-e2e.conflist"): fmt.Sprintf(`{"cniVersion":"1.0.0","name":"e2e","plugins":[{"type":"e2e-isolated",
  "ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.0.0/24"}]],"dataDir":%q}}]}
`, filepath.Join(n.ctrdDir, "cni-ipam")),
		filepath.Join(n.ctrdDir, "config.toml"): fmt.Sprintf(`version = 2
root = %q
state = %q
[grpc]
  address = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = %q
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
`, filepath.Join(n.ctrdDir, "root"), filepath.Join(n.ctrdDir, "state"), n.socket, n.pauseImg,
			filepath.Join(n.ctrdDir, "runc-wrapper"), cniBin, cniConf),
	}
	for path, content := range files {
		if err := os.WriteFile(path, []byte(content), 0o755); err != nil {
			return nil, err
		}
	}
	var err error
	n.ctrd, err = ps.start("containerd", nil, "containerd", "--config", filepath.Join(n.ctrdDir, "config.toml"))
	if err != nil {
		return nil, err
	}
	if err := waitFor("containerd", 30*time.Second, n.ctrd, func() error {
		_, err := n.ctr("version")
		return err
	}); err != nil {
		return nil, err
	}
	return n, nil
}

func (n *node) ctr(args ...string) ([]byte, error) {
	out, err := exec.Command("ctr", append([]string{"-a", n.socket, "-n", "k8s.io"}, args...)...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("ctr %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return out, nil
}

func (n *node) importImage(tarball string) error {
	_, err := n.ctr("images", "import", "--no-unpack=false", tarball)
	return err
}

// startKubelet registers the node and waits until it is Ready.
func (n *node) startKubelet(ctx context.Context, cp *controlPlane) error {
	port, err := freePort()
	if err != nil {
		return err
	}
	healthz, err := freePort()
	if err != nil {
		return err
	}
	n.logsDir = filepath.Join(n.work, "pod-logs")
	for _, d := range []string{kubeletRoot, n.logsDir, filepath.Join(n.work, "manifests")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	p := cp.pki.path
	cfg := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: %d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %d
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %s}
authorization: {mode: AlwaysAllow}
tlsCertFile: %s
tlsPrivateKeyFile: %s
containerRuntimeEndpoint: unix://%s
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
enforceNodeAllocatable: []
staticPodPath: %s
podLogsDir: %s
resolvConf: ""
evictionHard: {memory.available: "1Mi", nodefs.available: "0%%", imagefs.available: "0%%", nodefs.inodesFree: "0%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
localStorageCapacityIsolation: false
serializeImagePulls: false
registerNode: true
nodeStatusUpdateFrequency: 5s
clusterDNS: []
clusterDomain: cluster.local
`, port, healthz, p("ca.crt"), p("apiserver.crt"), p("apiserver.key"), n.socket,
		filepath.Join(n.work, "manifests"), n.logsDir)
	cfgPath := filepath.Join(n.work, "kubelet-config.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return err
	}
	n.kubelet, err = n.procs.start("kubelet", nil, filepath.Join(cp.bin, "kubelet"),
		"--config="+cfgPath, "--kubeconfig="+cp.kubeletKC, "--hostname-override="+nodeName,
		"--root-dir="+kubeletRoot, "--v=2")
	if err != nil {
		return err
	}
	return waitFor("node Ready", 90*time.Second, n.kubelet, func() error {
		out, err := cp.kubectl(ctx, nil, "get", "node", nodeName, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		if err != nil {
			return err
		}
		if strings.TrimSpace(string(out)) != "True" {
			return fmt.Errorf("Ready=%q", out)
		}
		return nil
	})
}

// stop tears the node down: kubelet, every container and shim of our containerd,
// containerd, then the mounts kubelet and containerd left, the pod network namespaces and
// the empty cgroups of the pods. Errors are reported, not fatal: teardown goes on.
func (n *node) stop() []error {
	var errs []error
	if n.kubelet != nil {
		n.kubelet.stop(30 * time.Second)
	}
	shims := n.shimPids()
	if n.ctrd != nil && n.ctrd.running() {
		if out, err := n.ctr("tasks", "ls", "-q"); err == nil {
			for _, id := range strings.Fields(string(out)) {
				_, _ = n.ctr("tasks", "kill", "-a", "-s", "SIGKILL", id)
			}
			time.Sleep(time.Second)
			for _, id := range strings.Fields(string(out)) {
				_, _ = n.ctr("tasks", "delete", "-f", id)
			}
		}
		if out, err := n.ctr("containers", "ls", "-q"); err == nil {
			for _, id := range strings.Fields(string(out)) {
				_, _ = n.ctr("containers", "delete", id)
			}
		}
		n.ctrd.stop(10 * time.Second)
	}
	// shims outlive containerd; they were started by it, for our socket: kill them by pid
	for _, pid := range shims {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	if err := unmountUnder(kubeletRoot, n.work); err != nil {
		errs = append(errs, err)
	}
	if ns, _ := filepath.Glob("/run/netns/cni-*"); len(ns) > 0 {
		for _, p := range ns {
			if n.ownsNetns(p) {
				_ = syscall.Unmount(p, syscall.MNT_DETACH)
				_ = os.Remove(p)
			}
		}
	}
	removeEmptyCgroups()
	return errs
}

// shimPids are the containerd-shim-runc-v2 processes serving our containerd: their
// command line names our socket.
func (n *node) shimPids() []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(cmdline), "\x00")
		if len(args) > 0 && strings.HasSuffix(args[0], "containerd-shim-runc-v2") && slicesContains(args, n.socket) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func slicesContains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// ownsNetns: only network namespaces created for our pods are removed; the CNI IPAM data
// dir of our containerd lists them.
func (n *node) ownsNetns(path string) bool {
	data, err := exec.Command("grep", "-rl", filepath.Base(path), filepath.Join(n.ctrdDir, "cni-ipam")).Output()
	return err == nil && len(data) > 0
}

// unmountUnder detaches every mount at or below the given directories, deepest first.
func unmountUnder(dirs ...string) error {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	defer f.Close()
	var targets []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		for _, d := range dirs {
			if mp == d || strings.HasPrefix(mp, d+"/") {
				targets = append(targets, mp)
			}
		}
	}
	// deepest first
	for i := 0; i < len(targets); i++ {
		for j := i + 1; j < len(targets); j++ {
			if len(targets[j]) > len(targets[i]) {
				targets[i], targets[j] = targets[j], targets[i]
			}
		}
	}
	var errs []error
	for _, t := range targets {
		if err := syscall.Unmount(t, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("umount %s: %w", t, err))
		}
	}
	return errors.Join(errs...)
}

func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

// mountsUnder counts the mounts at or below dir.
func mountsUnder(dir string) int {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return -1
	}
	n := 0
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			n++
		}
	}
	return n
}

// removeEmptyCgroups removes the pod cgroups kubelet (kubepods) and containerd (k8s.io)
// made, deepest first; rmdir refuses cgroups that still have processes.
func removeEmptyCgroups() {
	var roots []string
	for _, pat := range []string{"/sys/fs/cgroup/*/kubepods", "/sys/fs/cgroup/*/k8s.io", "/sys/fs/cgroup/kubepods", "/sys/fs/cgroup/k8s.io"} {
		m, _ := filepath.Glob(pat)
		roots = append(roots, m...)
	}
	for _, r := range roots {
		var dirs []string
		_ = filepath.WalkDir(r, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			_ = syscall.Rmdir(dirs[i])
		}
	}
}
