package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type fakeIdentity struct {
	csi.UnimplementedIdentityServer
}

func (fakeIdentity) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: "rawcow.csi.io", VendorVersion: "test"}, nil
}

// registrarSetup starts a CSI identity server (the driver) and returns the paths a
// registrar needs: the driver socket, the socket path "on the host" and the registry dir.
func registrarSetup(t *testing.T) (csiSock, hostSock, regDir string) {
	t.Helper()
	dir := t.TempDir()
	csiSock = filepath.Join(dir, "csi", "csi.sock")
	hostSock = filepath.Join(dir, "plugins", "rawcow.csi.io", "csi.sock") // probe file goes beside it
	regDir = filepath.Join(dir, "plugins_registry")
	if err := os.MkdirAll(filepath.Dir(csiSock), 0o755); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", csiSock)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	csi.RegisterIdentityServer(g, fakeIdentity{})
	go g.Serve(l)
	t.Cleanup(g.Stop)
	return csiSock, hostSock, regDir
}

func startRegistrar(t *testing.T, args ...string) (*exec.Cmd, *bytes.Buffer, chan error) {
	t.Helper()
	cmd := exec.Command(binPath, append([]string{"registrar"}, args...)...)
	cmd.Env = testEnv
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		done <- nil
		if t.Failed() {
			t.Logf("registrar output:\n%s", out.String())
		}
	})
	return cmd, &out, done
}

func waitSocket(t *testing.T, path string, done chan error) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if st, err := os.Stat(path); err == nil && st.Mode().Type() == fs.ModeSocket {
			return
		}
		select {
		case err := <-done:
			done <- err
			t.Fatalf("registrar exited: %v", err)
		default:
		}
	}
	t.Fatalf("no registration socket %s", path)
}

func waitExit(t *testing.T, done chan error) int {
	t.Helper()
	select {
	case err := <-done:
		done <- err
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(20 * time.Second):
		t.Fatal("registrar did not exit")
		return -1
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestRegistrarCommand runs `csi-rawcow registrar` as kubelet meets it: GetInfo names the
// driver (learned from the driver's GetPluginInfo) and its host socket, a successful
// NotifyRegistrationStatus makes the probe mode pass, /healthz answers, and SIGTERM removes
// the registration socket and exits 0.
func TestRegistrarCommand(t *testing.T) {
	csiSock, hostSock, regDir := registrarSetup(t)
	port := freePort(t)
	cmd, _, done := startRegistrar(t, "--csi-address="+csiSock, "--kubelet-registration-path="+hostSock,
		"--plugin-registration-path="+regDir, fmt.Sprintf("--http-endpoint=127.0.0.1:%d", port), "--v=2")
	regSock := filepath.Join(regDir, "rawcow.csi.io-reg.sock")
	waitSocket(t, regSock, done)

	probe := func() int {
		p := exec.Command(binPath, "registrar", "--kubelet-registration-path="+hostSock, "--mode=kubelet-registration-probe")
		p.Env = testEnv
		err := p.Run()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	}
	if code := probe(); code == 0 {
		t.Error("probe passes before kubelet registered the plugin")
	}

	conn, err := grpc.NewClient("unix://"+regSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := registerapi.NewRegistrationClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := c.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != registerapi.CSIPlugin || info.Name != "rawcow.csi.io" || info.Endpoint != hostSock ||
		fmt.Sprint(info.SupportedVersions) != "[1.0.0]" {
		t.Errorf("GetInfo = %+v", info)
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
	if code := probe(); code != 0 {
		t.Errorf("probe exits %d after a successful registration", code)
	}

	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/healthz", port))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(body) != "ok" {
		t.Errorf("/healthz: %d %q", resp.StatusCode, body)
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(t, done); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
	if _, err := os.Lstat(regSock); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("registration socket left after SIGTERM: %v", err)
	}
	if code := probe(); code == 0 {
		t.Error("probe passes after the registrar stopped")
	}
}

// A failed registration makes the registrar exit 1, like node-driver-registrar, so that the
// container restarts and kubelet tries again.
func TestRegistrarCommandFailedRegistration(t *testing.T) {
	csiSock, hostSock, regDir := registrarSetup(t)
	_, _, done := startRegistrar(t, "--csi-address=unix://"+csiSock, "--kubelet-registration-path="+hostSock,
		"--plugin-registration-path="+regDir)
	regSock := filepath.Join(regDir, "rawcow.csi.io-reg.sock")
	waitSocket(t, regSock, done)
	conn, err := grpc.NewClient("unix://"+regSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := registerapi.NewRegistrationClient(conn).NotifyRegistrationStatus(ctx,
		&registerapi.RegistrationStatus{PluginRegistered: false, Error: "no"}); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(t, done); code != 1 {
		t.Errorf("exit code %d after a failed registration, want 1", code)
	}
	if _, err := os.Lstat(regSock); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("registration socket left: %v", err)
	}
}

func TestRegistrarUsage(t *testing.T) {
	for _, args := range [][]string{
		{"--csi-address=/x"}, // no --kubelet-registration-path
		{"--kubelet-registration-path=/x/csi.sock", "--mode=bogus"},
		{"--kubelet-registration-path=/x/csi.sock", "--health-port=9809", "--http-endpoint=:9810"},
		{"--kubelet-registration-path=/x/csi.sock", "extra"},
	} {
		cmd := exec.Command(binPath, append([]string{"registrar"}, args...)...)
		cmd.Env = testEnv
		err := cmd.Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 {
			t.Errorf("registrar %q: %v, want exit 2", args, err)
		}
	}
}
