package e2e

// Offline checks of deploy/kubernetes, run by the ordinary `go test ./...` (no build tag):
// every document parses, the kustomizations reference what exists, names agree with the
// driver's, the DaemonSet carries the flags and mounts the design needs, every flag given to
// a csi-rawcow command exists in that command, and `kubectl kustomize` renders the whole.
// The e2e (build tag e2e) then applies the same manifests to a live API server.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/rawcow/csi-rawcow/internal/testfs"
	"github.com/rawcow/csi-rawcow/pkg/driver"
)

const deployDir = "../../deploy/kubernetes"

type doc = map[string]any

// get walks a parsed document: get(d, "spec", "template", "spec", "containers").
func get(v any, path ...string) any {
	for _, p := range path {
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = m[p]
	}
	return v
}

func str(v any, path ...string) string {
	s, _ := get(v, path...).(string)
	return s
}

func list(v any, path ...string) []any {
	l, _ := get(v, path...).([]any)
	return l
}

func strs(v any, path ...string) []string {
	var out []string
	for _, x := range list(v, path...) {
		if s, ok := x.(string); ok {
			out = append(out, s)
		}
	}
	return out
}

// readDocs parses every document of a YAML file.
func readDocs(t *testing.T, path string) []doc {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var docs []doc
	for {
		var d doc
		err := dec.Decode(&d)
		if errors.Is(err, io.EOF) {
			return docs
		}
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if d != nil {
			docs = append(docs, d)
		}
	}
}

// manifests are the documents of every YAML file under deploy/kubernetes but the
// kustomizations and the inputs of Kubernetes' e2e suite (test-*.yaml), by file (relative path).
func manifests(t *testing.T) map[string][]doc {
	t.Helper()
	out := map[string][]doc{}
	err := filepath.WalkDir(deployDir, func(path string, de fs.DirEntry, err error) error {
		if err != nil || de.IsDir() || !strings.HasSuffix(path, ".yaml") || de.Name() == "kustomization.yaml" ||
			strings.HasPrefix(de.Name(), "test-") {
			return err
		}
		rel, _ := filepath.Rel(deployDir, path)
		out[rel] = readDocs(t, path)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) == 0 {
		t.Fatalf("no manifests in %s", deployDir)
	}
	return out
}

func find(t *testing.T, all map[string][]doc, kind, name string) doc {
	t.Helper()
	for _, docs := range all {
		for _, d := range docs {
			if str(d, "kind") == kind && str(d, "metadata", "name") == name {
				return d
			}
		}
	}
	t.Fatalf("no %s %s in %s", kind, name, deployDir)
	return nil
}

func TestManifestsParse(t *testing.T) {
	for file, docs := range manifests(t) {
		if len(docs) == 0 {
			t.Errorf("%s: no documents", file)
		}
		for i, d := range docs {
			if str(d, "apiVersion") == "" || str(d, "kind") == "" || str(d, "metadata", "name") == "" {
				t.Errorf("%s: document %d lacks apiVersion, kind or metadata.name", file, i)
			}
		}
	}
}

// Every resource a kustomization names exists, and every manifest outside examples/ is in a
// kustomization.
func TestKustomizations(t *testing.T) {
	referenced := map[string]bool{}
	var walk func(dir string)
	walk = func(dir string) {
		k := readDocs(t, filepath.Join(dir, "kustomization.yaml"))
		if len(k) != 1 {
			t.Fatalf("%s/kustomization.yaml: %d documents", dir, len(k))
		}
		for _, r := range strs(k[0], "resources") {
			p := filepath.Join(dir, r)
			st, err := os.Stat(p)
			if err != nil {
				t.Errorf("%s/kustomization.yaml: resource %s: %v", dir, r, err)
				continue
			}
			if st.IsDir() {
				walk(p)
				continue
			}
			rel, _ := filepath.Rel(deployDir, p)
			referenced[rel] = true
		}
	}
	walk(deployDir)
	for file := range manifests(t) {
		if !referenced[file] && !strings.HasPrefix(file, "examples"+string(filepath.Separator)) {
			t.Errorf("%s is in no kustomization", file)
		}
	}
}

// test-driver.yaml, the External Storage suite's description of the driver, agrees with the
// driver and the manifests: name, topology key, file systems the node formats, a StorageClass
// of this driver and an existing VolumeSnapshotClass.
func TestConformanceDriverFile(t *testing.T) {
	td := readDocs(t, filepath.Join(deployDir, "test-driver.yaml"))
	if len(td) != 1 {
		t.Fatalf("test-driver.yaml: %d documents", len(td))
	}
	if got := str(td[0], "DriverInfo", "Name"); got != driver.DefaultName {
		t.Errorf("DriverInfo.Name %q, want %q", got, driver.DefaultName)
	}
	if keys := strs(td[0], "DriverInfo", "TopologyKeys"); !slices.Equal(keys, []string{driver.TopologyKey}) {
		t.Errorf("DriverInfo.TopologyKeys %v, want [%s]", keys, driver.TopologyKey)
	}
	fsTypes, _ := get(td[0], "DriverInfo", "SupportedFsType").(map[string]any)
	for fs := range fsTypes {
		if fs != "" && fs != "ext4" && fs != "xfs" {
			t.Errorf("SupportedFsType %q: the node formats ext4 and xfs", fs)
		}
	}
	caps, _ := get(td[0], "DriverInfo", "Capabilities").(map[string]any)
	for _, c := range []string{"persistence", "block", "exec", "fsGroup", "multipods", "singleNodeVolume",
		"snapshotDataSource", "pvcDataSource", "controllerExpansion", "nodeExpansion", "onlineExpansion",
		"topology", "capacity"} {
		if caps[c] != true {
			t.Errorf("capability %s not declared", c)
		}
	}
	// the class file is found relative to --repo-root, the repository
	classFile := str(td[0], "StorageClass", "FromFile")
	sc := readDocs(t, filepath.Join("../..", classFile))
	if len(sc) != 1 || str(sc[0], "kind") != "StorageClass" || str(sc[0], "provisioner") != driver.DefaultName {
		t.Errorf("%s: want one StorageClass of %s", classFile, driver.DefaultName)
	}
	find(t, manifests(t), "VolumeSnapshotClass", str(td[0], "SnapshotClass", "FromExistingClassName"))
	vacFile := str(td[0], "VolumeAttributesClass", "FromFile")
	vac := readDocs(t, filepath.Join("../..", vacFile))
	if len(vac) != 1 || str(vac[0], "kind") != "VolumeAttributesClass" || str(vac[0], "driverName") != driver.DefaultName {
		t.Fatalf("%s: want one VolumeAttributesClass of %s", vacFile, driver.DefaultName)
	}
	params, _ := get(vac[0], "parameters").(map[string]any)
	for k := range params {
		if k != "presentation" {
			t.Errorf("%s: parameter %s cannot be set by a VolumeAttributesClass", vacFile, k)
		}
	}
}

// containersOf lists a pod template's init and regular containers.
func containersOf(d doc) []any {
	spec := get(d, "spec", "template", "spec")
	return append(list(spec, "initContainers"), list(spec, "containers")...)
}

// Every image is set in the top kustomization's images: section, fully qualified.
func TestImagesParameterised(t *testing.T) {
	k := readDocs(t, filepath.Join(deployDir, "kustomization.yaml"))[0]
	names := map[string]bool{}
	for _, im := range list(k, "images") {
		names[str(im, "name")] = true
		if str(im, "newTag") == "" && str(im, "digest") == "" {
			t.Errorf("image %s: no newTag or digest", str(im, "name"))
		}
	}
	seen := 0
	for file, docs := range manifests(t) {
		if strings.HasPrefix(file, "examples") {
			continue
		}
		for _, d := range docs {
			for _, c := range containersOf(d) {
				seen++
				image := str(c, "image")
				name, _, _ := strings.Cut(image, "@")
				if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
					name = name[:i]
				}
				if !names[name] {
					t.Errorf("%s: container %s: image %s is not in kustomization.yaml images:", file, str(c, "name"), image)
				}
				if !strings.Contains(strings.Split(name, "/")[0], ".") {
					t.Errorf("%s: container %s: image %s is not fully qualified", file, str(c, "name"), image)
				}
			}
		}
	}
	if seen < 7 {
		t.Errorf("found %d containers, want the node plugin's 6 and the snapshot controller", seen)
	}
}

func TestDriverObjects(t *testing.T) {
	all := manifests(t)
	name := driver.DefaultName
	cd := find(t, all, "CSIDriver", name)
	for path, want := range map[string]any{
		"attachRequired": false, "podInfoOnMount": true, "storageCapacity": true, "fsGroupPolicy": "File",
	} {
		if got := get(cd, "spec", path); got != want {
			t.Errorf("CSIDriver spec.%s = %v, want %v", path, got, want)
		}
	}
	if modes := strs(cd, "spec", "volumeLifecycleModes"); !slices.Equal(modes, []string{"Persistent"}) {
		t.Errorf("CSIDriver volumeLifecycleModes %v", modes)
	}
	classes := 0
	for _, docs := range all {
		for _, d := range docs {
			switch str(d, "kind") {
			case "StorageClass":
				classes++
				if str(d, "provisioner") != name {
					t.Errorf("StorageClass %s: provisioner %q", str(d, "metadata", "name"), str(d, "provisioner"))
				}
				if str(d, "volumeBindingMode") != "WaitForFirstConsumer" || get(d, "allowVolumeExpansion") != true {
					t.Errorf("StorageClass %s: want WaitForFirstConsumer and allowVolumeExpansion", str(d, "metadata", "name"))
				}
				params, _ := get(d, "parameters").(map[string]any)
				for k := range params {
					if k != "baseImage" && !strings.HasPrefix(k, "csi.storage.k8s.io/") {
						t.Errorf("StorageClass %s: parameter %s unknown to the driver", str(d, "metadata", "name"), k)
					}
				}
			case "VolumeSnapshotClass":
				if str(d, "driver") != name {
					t.Errorf("VolumeSnapshotClass %s: driver %q", str(d, "metadata", "name"), str(d, "driver"))
				}
			}
		}
	}
	if classes < 2 {
		t.Errorf("%d StorageClasses, want the default one and the base-image example", classes)
	}
	find(t, all, "VolumeSnapshotClass", "rawcow")
	sc := find(t, all, "StorageClass", "rawcow-debian-12")
	if str(sc, "parameters", "baseImage") == "" {
		t.Error("the base-image example StorageClass has no baseImage")
	}
}

type container struct {
	name    string
	init    bool
	raw     any
	args    []string
	mounts  map[string]any // mountPath -> volumeMount
	envFrom map[string]string
}

func containersByName(t *testing.T, ds doc) map[string]container {
	t.Helper()
	spec := get(ds, "spec", "template", "spec")
	volumes := map[string]bool{}
	for _, v := range list(spec, "volumes") {
		volumes[str(v, "name")] = true
	}
	out := map[string]container{}
	for i, c := range containersOf(ds) {
		ct := container{name: str(c, "name"), init: i < len(list(spec, "initContainers")), raw: c,
			args: strs(c, "args"), mounts: map[string]any{}, envFrom: map[string]string{}}
		for _, m := range list(c, "volumeMounts") {
			if !volumes[str(m, "name")] {
				t.Errorf("container %s mounts undefined volume %s", ct.name, str(m, "name"))
			}
			ct.mounts[str(m, "mountPath")] = m
		}
		for _, e := range list(c, "env") {
			ct.envFrom[str(e, "name")] = str(e, "valueFrom", "fieldRef", "fieldPath")
		}
		out[ct.name] = ct
	}
	return out
}

func hostPathOf(ds doc, volume string) string {
	for _, v := range list(get(ds, "spec", "template", "spec"), "volumes") {
		if str(v, "name") == volume {
			return str(v, "hostPath", "path")
		}
	}
	return ""
}

func TestNodeDaemonSet(t *testing.T) {
	all := manifests(t)
	ds := find(t, all, "DaemonSet", "csi-rawcow-node")
	cs := containersByName(t, ds)
	for _, n := range []string{"server", "driver", "registrar", "csi-provisioner", "csi-snapshotter", "csi-resizer"} {
		if _, ok := cs[n]; !ok {
			t.Fatalf("DaemonSet has no container %s", n)
		}
	}
	has := func(c container, args ...string) {
		t.Helper()
		for _, a := range args {
			if !slices.Contains(c.args, a) {
				t.Errorf("container %s: no argument %s (has %v)", c.name, a, c.args)
			}
		}
	}
	server, drv, reg := cs["server"], cs["driver"], cs["registrar"]
	if !server.init || str(server.raw, "restartPolicy") != "Always" {
		t.Error("server is not a native sidecar (init container with restartPolicy Always)")
	}
	if len(server.args) == 0 || server.args[0] != "serve" || len(drv.args) == 0 || drv.args[0] != "driver" ||
		len(reg.args) == 0 || reg.args[0] != "registrar" {
		t.Errorf("csi-rawcow commands: server %v, driver %v, registrar %v", server.args, drv.args, reg.args)
	}
	has(drv, "--server=external", "--nodeid=$(NODE_NAME)", "--endpoint=unix:///csi/csi.sock")
	for _, c := range []container{server, drv} {
		if get(c.raw, "securityContext", "privileged") != true {
			t.Errorf("%s is not privileged", c.name)
		}
	}

	pluginDir := hostPathOf(ds, "plugin-dir")
	if want := "/var/lib/kubelet/plugins/" + driver.DefaultName; pluginDir != want {
		t.Errorf("plugin-dir host path %s, want %s", pluginDir, want)
	}
	has(reg, "--csi-address=/csi/csi.sock", "--kubelet-registration-path="+pluginDir+"/csi.sock", "--plugin-registration-path=/registration")
	if hostPathOf(ds, "registration-dir") != "/var/lib/kubelet/plugins_registry" {
		t.Error("registration-dir is not kubelet's plugins_registry")
	}
	probe := strs(reg.raw, "livenessProbe", "exec", "command")
	if !slices.Contains(probe, "--mode=kubelet-registration-probe") || !slices.Contains(probe, "--kubelet-registration-path="+pluginDir+"/csi.sock") {
		t.Errorf("registrar liveness probe %v", probe)
	}

	for path, want := range map[string]string{"/var/lib/kubelet": "Bidirectional", "/dev": "", "/var/lib/csi-rawcow": "", "/run/csi-rawcow": "HostToContainer", "/csi": ""} {
		m, ok := drv.mounts[path]
		if !ok {
			t.Errorf("driver does not mount %s", path)
			continue
		}
		if want != "" && str(m, "mountPropagation") != want {
			t.Errorf("driver mount %s: propagation %q, want %s", path, str(m, "mountPropagation"), want)
		}
	}
	if m := server.mounts["/run/csi-rawcow"]; str(m, "mountPropagation") != "Bidirectional" {
		t.Error("server's /run/csi-rawcow is not Bidirectional")
	}
	for _, p := range []string{"/dev", "/var/lib/csi-rawcow"} {
		if _, ok := server.mounts[p]; !ok {
			t.Errorf("server does not mount %s", p)
		}
	}
	for volume, want := range map[string]string{"kubelet-dir": "/var/lib/kubelet", "dev": "/dev", "root-dir": "/var/lib/csi-rawcow", "run-dir": "/run/csi-rawcow"} {
		if got := hostPathOf(ds, volume); got != want {
			t.Errorf("volume %s: host path %q, want %s", volume, got, want)
		}
	}

	prov, snap, res := cs["csi-provisioner"], cs["csi-snapshotter"], cs["csi-resizer"]
	has(prov, "--csi-address=/csi/csi.sock", "--node-deployment=true", "--enable-capacity=true",
		"--capacity-ownerref-level=1", "--feature-gates=Topology=true", "--extra-create-metadata=true")
	has(snap, "--csi-address=/csi/csi.sock", "--node-deployment=true")
	has(res, "--csi-address=/csi/csi.sock")
	for _, c := range []container{drv, prov, snap} {
		if c.envFrom["NODE_NAME"] != "spec.nodeName" {
			t.Errorf("%s: NODE_NAME is not the node's name", c.name)
		}
	}
	if prov.envFrom["POD_NAME"] != "metadata.name" || prov.envFrom["NAMESPACE"] != "metadata.namespace" {
		t.Error("csi-provisioner lacks POD_NAME/NAMESPACE for the capacity owner")
	}
	for _, c := range []container{prov, snap, res, reg} {
		if _, ok := c.mounts["/csi"]; !ok {
			t.Errorf("%s does not mount the CSI socket directory", c.name)
		}
	}
	if sa := str(ds, "spec", "template", "spec", "serviceAccountName"); sa != "csi-rawcow-node" {
		t.Errorf("service account %q", sa)
	}

	sc := find(t, all, "Deployment", "snapshot-controller")
	args := strs(containersOf(sc)[0], "args")
	if !slices.Contains(args, "--enable-distributed-snapshotting=true") {
		t.Errorf("snapshot-controller args %v", args)
	}
	rbacHas := func(role doc, group, resource, verb string) bool {
		for _, r := range list(role, "rules") {
			if slices.Contains(strs(r, "apiGroups"), group) && slices.Contains(strs(r, "resources"), resource) && slices.Contains(strs(r, "verbs"), verb) {
				return true
			}
		}
		return false
	}
	for _, want := range []struct{ kind, role, group, resource, verb string }{
		{"ClusterRole", "csi-rawcow-provisioner", "", "persistentvolumes", "create"},
		{"Role", "csi-rawcow-provisioner-capacity", "storage.k8s.io", "csistoragecapacities", "create"},
		{"Role", "csi-rawcow-provisioner-capacity", "apps", "daemonsets", "get"},
		{"ClusterRole", "csi-rawcow-snapshotter", "snapshot.storage.k8s.io", "volumesnapshotcontents/status", "update"},
		// the driver's --label-snapshot-contents
		{"ClusterRole", "csi-rawcow-snapshotter", "snapshot.storage.k8s.io", "volumesnapshotcontents", "watch"},
		{"ClusterRole", "csi-rawcow-snapshotter", "snapshot.storage.k8s.io", "volumesnapshotcontents", "patch"},
		{"ClusterRole", "csi-rawcow-resizer", "", "persistentvolumeclaims/status", "patch"},
		{"ClusterRole", "csi-rawcow-snapshot-controller", "", "nodes", "list"},
	} {
		if !rbacHas(find(t, all, want.kind, want.role), want.group, want.resource, want.verb) {
			t.Errorf("%s %s cannot %s %s", want.kind, want.role, want.verb, want.resource)
		}
	}
}

// Every --flag given to a csi-rawcow command in the manifests is one that command defines.
func TestManifestFlagsExist(t *testing.T) {
	if testing.Short() {
		t.Skip("builds csi-rawcow")
	}
	bin := filepath.Join(t.TempDir(), "csi-rawcow")
	build := exec.Command("go", "build", "-o", bin, "../../cmd/csi-rawcow")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build csi-rawcow: %v\n%s", err, out)
	}
	defined := map[string]map[string]bool{}
	flagRe := regexp.MustCompile(`(?m)^\s+-([a-z0-9-]+)`)
	flagsOf := func(cmd string) map[string]bool {
		if f, ok := defined[cmd]; ok {
			return f
		}
		out, _ := exec.Command(bin, cmd, "-h").CombinedOutput() // exits 2 after the usage
		f := map[string]bool{}
		for _, m := range flagRe.FindAllStringSubmatch(string(out), -1) {
			f[m[1]] = true
		}
		if len(f) == 0 {
			t.Fatalf("csi-rawcow %s -h lists no flags:\n%s", cmd, out)
		}
		defined[cmd] = f
		return f
	}
	check := func(where string, argv []string) {
		if len(argv) == 0 {
			return
		}
		f := flagsOf(argv[0])
		for _, a := range argv[1:] {
			if !strings.HasPrefix(a, "-") {
				t.Errorf("%s: csi-rawcow %s: positional argument %q", where, argv[0], a)
				continue
			}
			name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
			if !f[name] {
				t.Errorf("%s: csi-rawcow %s has no flag --%s", where, argv[0], name)
			}
		}
	}
	for file, docs := range manifests(t) {
		for _, d := range docs {
			for _, c := range containersOf(d) {
				if !strings.Contains(str(c, "image"), "csi-rawcow") {
					continue
				}
				where := fmt.Sprintf("%s: %s", file, str(c, "name"))
				check(where, strs(c, "args"))
				if probe := strs(c, "livenessProbe", "exec", "command"); len(probe) > 0 && strings.HasSuffix(probe[0], "/csi-rawcow") {
					check(where+" liveness probe", probe[1:])
				}
			}
		}
	}
}

// kubectl renders the kustomization (client side; the e2e applies it to an API server).
func TestKustomizeRenders(t *testing.T) {
	kubectl := ""
	if paths, err := cachePaths(); err == nil {
		kubectl = filepath.Join(paths["K8S_BIN"], "kubectl")
	}
	if _, err := os.Stat(kubectl); err != nil {
		if kubectl, err = exec.LookPath("kubectl"); err != nil {
			testfs.Skip(t, "no kubectl (test/e2e/build-k8s.sh builds one)")
		}
	}
	t.Logf("using %s", kubectl)
	out, err := exec.Command(kubectl, "kustomize", deployDir).CombinedOutput()
	if err != nil {
		t.Fatalf("%s kustomize: %v\n%s", kubectl, err, out)
	}
	kinds := map[string]int{}
	dec := yaml.NewDecoder(bytes.NewReader(out))
	for {
		var d doc
		if err := dec.Decode(&d); err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatal(err)
			}
			break
		}
		kinds[str(d, "kind")]++
		if ns := str(d, "metadata", "namespace"); ns != "" && ns != "csi-rawcow" {
			t.Errorf("%s %s in namespace %s", str(d, "kind"), str(d, "metadata", "name"), ns)
		}
	}
	for kind, n := range map[string]int{"Namespace": 1, "CSIDriver": 1, "DaemonSet": 1, "Deployment": 1, "StorageClass": 1, "VolumeSnapshotClass": 1, "ServiceAccount": 2} {
		if kinds[kind] != n {
			t.Errorf("rendered %d %s, want %d (all: %v)", kinds[kind], kind, n, kinds)
		}
	}
}

// The e2e builds its csi-rawcow image like the Dockerfile (same Debian release, same
// packages, same binary path): keep the two in step.
func TestDockerfileMatchesE2EImage(t *testing.T) {
	df, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	script, err := os.ReadFile("build-k8s.sh")
	if err != nil {
		t.Fatal(err)
	}
	one := func(re, text, what string) string {
		t.Helper()
		m := regexp.MustCompile(re).FindStringSubmatch(text)
		if m == nil {
			t.Fatalf("%s not found (%s)", what, re)
		}
		return m[1]
	}
	dfRelease := one(`(?m)^ARG DEBIAN_RELEASE=(\S+)`, string(df), "Dockerfile ARG DEBIAN_RELEASE")
	shRelease := one(`(?m)^DEBIAN_RELEASE=\$\{DEBIAN_RELEASE:-(\S+)\}`, string(script), "build-k8s.sh DEBIAN_RELEASE")
	if dfRelease != shRelease {
		t.Errorf("Debian release: Dockerfile %s, build-k8s.sh %s", dfRelease, shRelease)
	}
	dfPkgs := strings.Fields(one(`--no-install-recommends \\\n\s+([a-z0-9 .+-]+?) \\\n`, string(df), "Dockerfile apt-get install"))
	shPkgs := strings.Fields(one(`(?m)^RUNTIME_PACKAGES="([^"]+)"`, string(script), "build-k8s.sh RUNTIME_PACKAGES"))
	slices.Sort(dfPkgs)
	slices.Sort(shPkgs)
	if !slices.Equal(dfPkgs, shPkgs) {
		t.Errorf("runtime packages: Dockerfile %v, build-k8s.sh %v", dfPkgs, shPkgs)
	}
	entry := one(`(?m)^ENTRYPOINT \["([^"]+)"\]`, string(df), "Dockerfile ENTRYPOINT")
	ds := find(t, manifests(t), "DaemonSet", "csi-rawcow-node")
	reg := containersByName(t, ds)["registrar"]
	if probe := strs(reg.raw, "livenessProbe", "exec", "command"); len(probe) == 0 || probe[0] != entry {
		t.Errorf("registrar probe runs %v, the image's binary is %s", probe, entry)
	}
}
