//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// deployment is deploy/kubernetes applied through an overlay that only changes what must
// differ on a shared test machine: the csi-rawcow image (built from this tree), the node's
// root and run directories (under the work directory, not /var/lib/csi-rawcow and
// /run/csi-rawcow), and the way to the API server: there is no kube-proxy and pods get an
// isolated network here, so the pods that talk to the API server use the host's network and
// reach it on loopback (KUBERNETES_SERVICE_HOST/PORT instead of the service IP).
type deployment struct {
	cp      *controlPlane
	overlay string
	pod     string
	lib     string // host: the driver's root (store, images)
	run     string // host: the presentation server's run directory
}

var (
	deployOnce sync.Once
	deployErr  error
)

// driverDeployed deploys the driver on first use and returns it.
func driverDeployed(t *testing.T) *deployment {
	t.Helper()
	e := cluster(t)
	deployOnce.Do(func() { e.deploy, deployErr = deploy(e) })
	if deployErr != nil {
		t.Fatalf("deploy: %v", deployErr)
	}
	return e.deploy
}

func deploy(e *env) (*deployment, error) {
	ctx := context.Background()
	t0 := time.Now()
	if err := buildDriverImages(e.node, e.paths, e.repo, e.bbLayer); err != nil {
		return nil, err
	}
	fmt.Fprintf(os.Stderr, "e2e: driver images built and imported in %v\n", time.Since(t0).Round(time.Millisecond))
	d := &deployment{cp: e.cp, overlay: filepath.Join(e.work, "overlay"),
		lib: filepath.Join(e.node.work, "csi-rawcow-lib"), run: filepath.Join(e.node.work, "csi-rawcow-run")}
	// Bidirectional propagation wants the host path on a shared mount ("/" is private here)
	if err := sharedMount(e.node.work); err != nil {
		return nil, err
	}
	e.loops = loopDevices()
	base, err := filepath.Rel(d.overlay, filepath.Join(e.repo, "deploy", "kubernetes"))
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(d.overlay, 0o755); err != nil {
		return nil, err
	}
	tag := rawcowImage[strings.LastIndex(rawcowImage, ":")+1:]
	apiPort := e.cp.server[strings.LastIndex(e.cp.server, ":")+1:]
	apiEnv := fmt.Sprintf(`env:
                  - {name: KUBERNETES_SERVICE_HOST, value: "127.0.0.1"}
                  - {name: KUBERNETES_SERVICE_PORT, value: "%s"}`, apiPort)
	kustomization := fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - %[1]s
images:
  - name: ghcr.io/rawcow/csi-rawcow
    newTag: %[2]s
patches:
  - patch: |-
      apiVersion: apps/v1
      kind: DaemonSet
      metadata:
        name: csi-rawcow-node
        namespace: csi-rawcow
      spec:
        template:
          spec:
            hostNetwork: true
            containers:
              - name: driver
                %[5]s
              - name: csi-provisioner
                %[5]s
              - name: csi-snapshotter
                %[5]s
              - name: csi-resizer
                %[5]s
            volumes:
              - name: root-dir
                hostPath: {path: %[3]s, type: DirectoryOrCreate}
              - name: run-dir
                hostPath: {path: %[4]s, type: DirectoryOrCreate}
  - patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata:
        name: snapshot-controller
        namespace: csi-rawcow
      spec:
        template:
          spec:
            hostNetwork: true
            containers:
              - name: snapshot-controller
                %[5]s
`, base, tag, d.lib, d.run, apiEnv)
	if err := os.WriteFile(filepath.Join(d.overlay, "kustomization.yaml"), []byte(kustomization), 0o644); err != nil {
		return nil, err
	}
	// CRDs first (VolumeSnapshotClass needs them), then a server-side dry run: the API
	// server validates every object, unknown fields included
	if _, err := e.cp.kubectl(ctx, nil, "apply", "--server-side", "-f", e.paths["CRD_DIR"]); err != nil {
		return nil, err
	}
	if _, err := e.cp.kubectl(ctx, nil, "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all"); err != nil {
		return nil, err
	}
	// (a server-side dry run creates no namespace: the namespaced objects need it to exist)
	if _, err := e.cp.kubectl(ctx, nil, "apply", "-f", filepath.Join(e.repo, "deploy", "kubernetes", "namespace.yaml")); err != nil {
		return nil, err
	}
	if out, err := e.cp.kubectl(ctx, nil, "apply", "--dry-run=server", "--validate=strict", "-k", d.overlay); err != nil {
		return nil, fmt.Errorf("server-side dry run of deploy/kubernetes: %w\n%s", err, out)
	}
	if out, err := e.cp.kubectl(ctx, nil, "apply", "--validate=strict", "-k", d.overlay); err != nil {
		return nil, fmt.Errorf("apply deploy/kubernetes: %w\n%s", err, out)
	}
	t1 := time.Now()
	err = waitFor("csi-rawcow-node pod Ready", 3*time.Minute, e.node.kubelet, func() error {
		out, err := e.cp.kubectl(ctx, nil, "get", "pods", "-n", "csi-rawcow", "-l", "app.kubernetes.io/component=node",
			"-o", `jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}`)
		if err != nil {
			return err
		}
		name, ready, _ := strings.Cut(strings.TrimSpace(string(out)), " ")
		d.pod = name
		if ready != "True" {
			return fmt.Errorf("pod %q Ready=%q", name, ready)
		}
		return nil
	})
	if err != nil {
		return d, fmt.Errorf("%w\n%s", err, d.describe(ctx))
	}
	err = waitFor("driver registered with kubelet", time.Minute, e.node.kubelet, func() error {
		out, err := e.cp.kubectl(ctx, nil, "get", "csinode", nodeName, "-o", "jsonpath={.spec.drivers[*].name}")
		if err != nil {
			return err
		}
		if !strings.Contains(string(out), "rawcow.csi.io") {
			return fmt.Errorf("CSINode drivers %q", out)
		}
		return nil
	})
	if err != nil {
		return d, fmt.Errorf("%w\n%s", err, d.describe(ctx))
	}
	// Ready says little without probes: every container must run without having restarted
	time.Sleep(5 * time.Second)
	out, err := e.cp.kubectl(ctx, nil, "get", "pods", "-n", "csi-rawcow", "-o",
		`jsonpath={range .items[*].status.initContainerStatuses[*]}{.name}={.restartCount} {end}{range .items[*].status.containerStatuses[*]}{.name}={.restartCount} {end}`)
	if err != nil {
		return d, err
	}
	for _, f := range strings.Fields(string(out)) {
		if !strings.HasSuffix(f, "=0") {
			return d, fmt.Errorf("restarted containers: %s\n%s", out, d.describe(ctx))
		}
	}
	fmt.Fprintf(os.Stderr, "e2e: csi-rawcow deployed, pod %s Ready and registered in %v\n", d.pod, time.Since(t1).Round(time.Millisecond))
	return d, nil
}

// describe gathers the node pod's state and its containers' logs for a failure message.
func (d *deployment) describe(ctx context.Context) string {
	var b strings.Builder
	out, _ := d.cp.kubectl(ctx, nil, "describe", "pods", "-n", "csi-rawcow")
	b.Write(out)
	if d.pod != "" {
		for _, c := range []string{"server", "driver", "registrar", "csi-provisioner", "csi-snapshotter", "csi-resizer"} {
			out, err := d.cp.kubectl(ctx, nil, "logs", "-n", "csi-rawcow", d.pod, "-c", c, "--tail=30")
			fmt.Fprintf(&b, "\n--- %s (%v)\n%s", c, err, out)
		}
	}
	return b.String()
}

// remove deletes what the tests left (their namespaces, then the volumes, which the driver
// must delete while it runs), then the driver itself, letting kubelet stop its pod in order.
func (d *deployment) remove(ctx context.Context, logDir string) error {
	defer d.saveLogs(ctx, logDir)
	_, _ = d.cp.kubectl(ctx, nil, "delete", "namespace", "-l", "csi-rawcow-e2e=true", "--wait=true", "--timeout=120s")
	_ = waitFor("volumes deleted", 90*time.Second, nil, func() error {
		out, err := d.cp.kubectl(ctx, nil, "get", "pv", "-o", "name")
		if err != nil {
			return err
		}
		if s := strings.TrimSpace(string(out)); s != "" {
			return fmt.Errorf("left: %s", s)
		}
		return nil
	})
	d.saveLogs(ctx, logDir) // kubelet removes the logs with the pods
	_, err := d.cp.kubectl(ctx, nil, "delete", "-k", d.overlay, "--wait=true", "--timeout=120s", "--ignore-not-found")
	return err
}

// saveLogs copies the logs of the driver's pods to logDir/pod-POD-CONTAINER.log.
func (d *deployment) saveLogs(ctx context.Context, logDir string) {
	out, err := d.cp.kubectl(ctx, nil, "get", "pods", "-n", "csi-rawcow", "-o",
		`jsonpath={range .items[*]}{.metadata.name}{range .spec.initContainers[*]} {.name}{end}{range .spec.containers[*]} {.name}{end}{"\n"}{end}`)
	if err != nil {
		return
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		for _, c := range f[1:] {
			logs, _ := d.cp.kubectl(ctx, nil, "logs", "-n", "csi-rawcow", f[0], "-c", c)
			if len(logs) > 0 {
				_ = os.WriteFile(filepath.Join(logDir, "pod-"+f[0]+"-"+c+".log"), logs, 0o644)
			}
		}
	}
}

// sharedMount makes dir a shared mount point (a bind mount of itself).
func sharedMount(dir string) error {
	if err := syscall.Mount(dir, dir, "", syscall.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s: %w", dir, err)
	}
	if err := syscall.Mount("", dir, "", syscall.MS_SHARED|syscall.MS_REC, ""); err != nil {
		return fmt.Errorf("make-rshared %s: %w", dir, err)
	}
	return nil
}

// loopDevices lists the configured loop devices: device -> backing file.
func loopDevices() map[string]string {
	out := map[string]string{}
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(f)))
		out[dev] = strings.TrimSpace(string(b))
	}
	return out
}

// detachNewLoops detaches loop devices that appeared during the run on files of the
// driver (the presentation server's FUSE files, seen from its container as
// /run/csi-rawcow/fuse/..., or anything under the work directory); the server detaches
// its devices when it stops, this is the safety net.
func detachNewLoops(before map[string]string, work string) {
	if before == nil {
		return
	}
	for dev, backing := range loopDevices() {
		if old, ok := before[dev]; ok && old == backing {
			continue
		}
		if !strings.HasPrefix(backing, "/run/csi-rawcow/fuse/") && !strings.HasPrefix(backing, work+"/") {
			continue
		}
		f, err := os.OpenFile(dev, os.O_RDONLY, 0)
		if err != nil {
			continue
		}
		const loopClrFD = 0x4C01
		if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), loopClrFD, 0); errno != 0 {
			fmt.Fprintf(os.Stderr, "e2e: teardown: detach %s (%s): %v\n", dev, backing, errno)
		} else {
			fmt.Fprintf(os.Stderr, "e2e: teardown: detached %s (%s)\n", dev, backing)
		}
		f.Close()
	}
}
