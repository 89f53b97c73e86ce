//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// controlPlane is etcd (Debian's etcd-server), kube-apiserver, kube-controller-manager and
// kube-scheduler from the cache, on loopback ports nobody else uses, with a throwaway PKI.
type controlPlane struct {
	work       string // everything of this run: pki/, etcd/, logs/
	bin        string // K8S_BIN
	nodeName   string
	procs      *procs
	pki        *pki
	server     string // https://127.0.0.1:PORT
	kubeconfig string // admin (system:masters)
	kubeletKC  string // system:node:NODE
	apiserver  *proc
}

func startControlPlane(ctx context.Context, work, bin, nodeName string, ps *procs) (*controlPlane, error) {
	cp := &controlPlane{work: work, bin: bin, nodeName: nodeName, procs: ps}
	etcd, err := exec.LookPath("etcd")
	if err != nil {
		return nil, fmt.Errorf("etcd not found (apt-get install etcd-server): %w", err)
	}
	ports := make([]int, 5)
	for i := range ports {
		if ports[i], err = freePort(); err != nil {
			return nil, err
		}
	}
	etcdClient, etcdPeer, apiPort, kcmPort, schedPort := ports[0], ports[1], ports[2], ports[3], ports[4]
	cp.server = fmt.Sprintf("https://127.0.0.1:%d", apiPort)

	// PKI
	if cp.pki, err = newPKI(filepath.Join(work, "pki")); err != nil {
		return nil, err
	}
	if err := cp.pki.issue("apiserver", pkix.Name{CommonName: "kube-apiserver"}, x509.ExtKeyUsageServerAuth,
		[]string{"localhost", nodeName, "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		[]net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.0.0.1")}); err != nil {
		return nil, err
	}
	if err := cp.pki.serviceAccountKeys(); err != nil {
		return nil, err
	}
	if cp.kubeconfig, err = cp.pki.client("admin", "admin", "system:masters", cp.server); err != nil {
		return nil, err
	}
	kcmKC, err := cp.pki.client("controller-manager", "system:kube-controller-manager", "", cp.server)
	if err != nil {
		return nil, err
	}
	schedKC, err := cp.pki.client("scheduler", "system:kube-scheduler", "", cp.server)
	if err != nil {
		return nil, err
	}
	if cp.kubeletKC, err = cp.pki.client("kubelet", "system:node:"+nodeName, "system:nodes", cp.server); err != nil {
		return nil, err
	}
	p := cp.pki.path

	// etcd: data on the work dir, no fsync
	ep, err := ps.start("etcd", []string{"ETCD_UNSUPPORTED_ARCH="}, etcd,
		"--name=e2e", "--data-dir="+filepath.Join(work, "etcd"),
		fmt.Sprintf("--listen-client-urls=http://127.0.0.1:%d", etcdClient),
		fmt.Sprintf("--advertise-client-urls=http://127.0.0.1:%d", etcdClient),
		fmt.Sprintf("--listen-peer-urls=http://127.0.0.1:%d", etcdPeer),
		fmt.Sprintf("--initial-advertise-peer-urls=http://127.0.0.1:%d", etcdPeer),
		fmt.Sprintf("--initial-cluster=e2e=http://127.0.0.1:%d", etcdPeer),
		"--unsafe-no-fsync=true", "--quota-backend-bytes=2147483648")
	if err != nil {
		return nil, err
	}
	if err := waitFor("etcd healthy", 30*time.Second, ep, func() error {
		return httpOK(ctx, http.DefaultClient, fmt.Sprintf("http://127.0.0.1:%d/health", etcdClient), `"health":"true"`)
	}); err != nil {
		return nil, err
	}

	cp.apiserver, err = ps.start("kube-apiserver", nil, filepath.Join(bin, "kube-apiserver"),
		fmt.Sprintf("--etcd-servers=http://127.0.0.1:%d", etcdClient),
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--secure-port="+strconv.Itoa(apiPort),
		"--tls-cert-file="+p("apiserver.crt"), "--tls-private-key-file="+p("apiserver.key"),
		"--client-ca-file="+p("ca.crt"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+p("sa.pub"), "--service-account-signing-key-file="+p("sa.key"),
		"--service-cluster-ip-range=10.0.0.0/24",
		"--authorization-mode=Node,RBAC",
		"--allow-privileged=true",
		"--kubelet-client-certificate="+p("admin.crt"), "--kubelet-client-key="+p("admin.key"),
		"--kubelet-preferred-address-types=Hostname,InternalIP",
		"--enable-priority-and-fairness=false", "--endpoint-reconciler-type=none")
	if err != nil {
		return nil, err
	}
	client, err := cp.httpClient()
	if err != nil {
		return nil, err
	}
	if err := waitFor("kube-apiserver ready", 90*time.Second, cp.apiserver, func() error {
		return httpOK(ctx, client, cp.server+"/readyz", "ok")
	}); err != nil {
		return nil, err
	}

	kcm, err := ps.start("kube-controller-manager", nil, filepath.Join(bin, "kube-controller-manager"),
		"--kubeconfig="+kcmKC, "--authentication-kubeconfig="+kcmKC, "--authorization-kubeconfig="+kcmKC,
		"--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(kcmPort), "--leader-elect=false",
		"--service-account-private-key-file="+p("sa.key"), "--root-ca-file="+p("ca.crt"),
		"--use-service-account-credentials=true",
		"--cluster-signing-cert-file="+p("ca.crt"), "--cluster-signing-key-file="+p("ca.key"),
		"--controllers=*,-nodeipam,-service-lb-controller,-cloud-node-lifecycle-controller,-node-route-controller")
	if err != nil {
		return nil, err
	}
	if _, err := ps.start("kube-scheduler", nil, filepath.Join(bin, "kube-scheduler"),
		"--kubeconfig="+schedKC, "--authentication-kubeconfig="+schedKC, "--authorization-kubeconfig="+schedKC,
		"--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(schedPort), "--leader-elect=false"); err != nil {
		return nil, err
	}
	// pods are refused until the controller-manager made the default service account
	if err := waitFor("default service account", 60*time.Second, kcm, func() error {
		_, err := cp.kubectl(ctx, nil, "get", "serviceaccount", "default", "-n", "default")
		return err
	}); err != nil {
		return nil, err
	}
	return cp, nil
}

func (cp *controlPlane) httpClient() (*http.Client, error) {
	ca, err := os.ReadFile(cp.pki.path("ca.crt"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	cert, err := tls.LoadX509KeyPair(cp.pki.path("admin.crt"), cp.pki.path("admin.key"))
	if err != nil {
		return nil, err
	}
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}},
	}}, nil
}

func httpOK(ctx context.Context, c *http.Client, url, want string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), want) {
		return fmt.Errorf("GET %s: %d %s", url, resp.StatusCode, bytes.TrimSpace(body))
	}
	return nil
}

// kubectl runs the cached kubectl as cluster admin; stdin may be nil.
func (cp *controlPlane) kubectl(ctx context.Context, stdin []byte, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(cp.bin, "kubectl"), append([]string{"--kubeconfig=" + cp.kubeconfig}, args...)...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return out, nil
}
