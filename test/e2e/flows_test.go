//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"
)

// ns makes a namespace for one test, deleted (with its claims, snapshots and pods) at its
// end, waiting until the volumes of its claims are deleted too. Cleanups run last first:
// what must happen after the volumes are gone is registered before ns is called.
func ns(t *testing.T, e *env) string {
	t.Helper()
	name := "e2e-" + strings.ToLower(regexp.MustCompile(`[^a-zA-Z0-9]+`).ReplaceAllString(t.Name(), "-"))
	if len(name) > 60 {
		name = name[:60]
	}
	name = strings.TrimRight(name, "-")
	ctx := context.Background()
	if _, err := e.cp.kubectl(ctx, nil, "create", "namespace", name); err != nil {
		t.Fatal(err)
	}
	if _, err := e.cp.kubectl(ctx, nil, "label", "namespace", name, "csi-rawcow-e2e=true"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := e.cp.kubectl(ctx, nil, "get", "events", "-n", name, "--sort-by=.lastTimestamp")
			t.Logf("events in %s:\n%s", name, out)
		}
		if _, err := e.cp.kubectl(ctx, nil, "delete", "namespace", name, "--wait=true", "--timeout=120s"); err != nil {
			t.Errorf("delete namespace: %v", err)
		}
		// then the provisioner deletes the claims' volumes (reclaimPolicy Delete)
		if err := waitPVsGone(e, name, 2*time.Minute); err != nil {
			t.Error(err)
		}
	})
	return name
}

func apply(t *testing.T, e *env, namespace, manifest string) {
	t.Helper()
	if out, err := e.cp.kubectl(context.Background(), []byte(manifest), "apply", "-n", namespace, "-f", "-"); err != nil {
		t.Fatalf("apply: %v\n%s", err, out)
	}
}

func kwait(t *testing.T, e *env, namespace, timeout string, args ...string) {
	t.Helper()
	a := append([]string{"wait", "-n", namespace, "--timeout=" + timeout}, args...)
	if _, err := e.cp.kubectl(context.Background(), nil, a...); err != nil {
		out, _ := e.cp.kubectl(context.Background(), nil, "describe", "-n", namespace, "pvc,pods")
		t.Fatalf("%v\n%s", err, out)
	}
}

func podExec(t *testing.T, e *env, namespace, pod string, cmd ...string) string {
	t.Helper()
	out, err := e.cp.kubectl(context.Background(), nil, append([]string{"exec", "-n", namespace, pod, "--"}, cmd...)...)
	if err != nil {
		t.Fatalf("exec %s %v: %v\n%s", pod, cmd, err, out)
	}
	return string(out)
}

func pvc(name, class, size, mode string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: %s}
spec:
  storageClassName: %s
  volumeMode: %s
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: %s}}
`, name, class, mode, size)
}

// testPod is a busybox pod running command with claim attached as attach says (a
// volumeMounts or volumeDevices line naming the volume d).
func testPod(name, claim, command, attach string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: %s}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: %s
    imagePullPolicy: IfNotPresent
    command: %s
    %s
  volumes: [{name: d, persistentVolumeClaim: {claimName: %s}}]
`, name, busyboxImage, command, attach, claim)
}

func podWithFS(name, claim, script string) string {
	return testPod(name, claim, fmt.Sprintf(`["sh", "-c", %q]`, script), "volumeMounts: [{name: d, mountPath: /data}]")
}

// Flow 1: a Filesystem claim (WaitForFirstConsumer) is created on the pod's node, a pod
// writes a file, the pod goes, a second pod reads the file back.
func TestFilesystemPersists(t *testing.T) {
	e := cluster(t)
	driverDeployed(t)
	n := ns(t, e)
	t0 := time.Now()
	apply(t, e, n, pvc("data", "rawcow", "64Mi", "Filesystem")+"---\n"+
		podWithFS("writer", "data", "echo hello-rawcow > /data/file && sync && sleep 3600"))
	kwait(t, e, n, "180s", "--for=condition=Ready", "pod/writer")
	t.Logf("claim bound and writer running in %v", time.Since(t0).Round(time.Millisecond))
	if got := podExec(t, e, n, "writer", "cat", "/data/file"); got != "hello-rawcow\n" {
		t.Fatalf("writer reads %q", got)
	}
	df := podExec(t, e, n, "writer", "df", "-k", "/data")
	t.Logf("df in the pod:\n%s", df)
	if _, err := e.cp.kubectl(context.Background(), nil, "delete", "pod", "-n", n, "writer", "--wait=true", "--timeout=90s"); err != nil {
		t.Fatal(err)
	}
	apply(t, e, n, podWithFS("reader", "data", "sleep 3600"))
	kwait(t, e, n, "120s", "--for=condition=Ready", "pod/reader")
	if got := podExec(t, e, n, "reader", "cat", "/data/file"); got != "hello-rawcow\n" {
		t.Fatalf("reader reads %q", got)
	}
	// the volume lives on this node: the PV's node affinity says so
	out, err := e.cp.kubectl(context.Background(), nil, "get", "pv", "-o",
		`jsonpath={.items[?(@.spec.claimRef.namespace=="`+n+`")].spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}`)
	if err != nil || string(out) != nodeName {
		t.Errorf("PV node affinity %q: %v", out, err)
	}
}

func podWithBlock(name, claim string) string {
	return testPod(name, claim, `["sleep", "3600"]`, "volumeDevices: [{name: d, devicePath: /dev/xvda}]")
}

// Flow 2: a Block claim (the KubeVirt VM-disk shape): a pod writes a pattern to the raw
// device and reads it back; a second pod sees the same bytes.
func TestBlockVolume(t *testing.T) {
	e := cluster(t)
	driverDeployed(t)
	n := ns(t, e)
	apply(t, e, n, pvc("disk", "rawcow", "32Mi", "Block")+"---\n"+podWithBlock("vm", "disk"))
	kwait(t, e, n, "180s", "--for=condition=Ready", "pod/vm")
	size := strings.TrimSpace(podExec(t, e, n, "vm", "blockdev", "--getsize64", "/dev/xvda"))
	if size != fmt.Sprint(32<<20) {
		t.Errorf("device size %s, want %d", size, 32<<20)
	}
	// 1 MiB of random data at offset 4 MiB, written with O_DIRECT-like fsync, read back
	podExec(t, e, n, "vm", "sh", "-c", "dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null && "+
		"dd if=/tmp/pattern of=/dev/xvda bs=64k seek=64 conv=fsync 2>/dev/null")
	want := podExec(t, e, n, "vm", "md5sum", "/tmp/pattern")[:32]
	got := podExec(t, e, n, "vm", "sh", "-c", "dd if=/dev/xvda bs=64k skip=64 count=16 2>/dev/null | md5sum")[:32]
	if got != want {
		t.Fatalf("read back %s, wrote %s", got, want)
	}
	if _, err := e.cp.kubectl(context.Background(), nil, "delete", "pod", "-n", n, "vm", "--wait=true", "--timeout=90s"); err != nil {
		t.Fatal(err)
	}
	apply(t, e, n, podWithBlock("vm2", "disk"))
	kwait(t, e, n, "120s", "--for=condition=Ready", "pod/vm2")
	if got := podExec(t, e, n, "vm2", "sh", "-c", "dd if=/dev/xvda bs=64k skip=64 count=16 2>/dev/null | md5sum")[:32]; got != want {
		t.Fatalf("second pod reads %s, want %s", got, want)
	}
	// the rest of the disk reads zero
	if z := podExec(t, e, n, "vm2", "sh", "-c", "dd if=/dev/xvda bs=64k count=64 2>/dev/null | tr -d '\\000' | wc -c"); strings.TrimSpace(z) != "0" {
		t.Errorf("first 4 MiB hold %s non-zero bytes", strings.TrimSpace(z))
	}
}
