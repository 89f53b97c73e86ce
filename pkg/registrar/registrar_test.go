package registrar

import (
	"context"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// kubeletDial connects to a registration socket the way kubelet's plugin watcher does
// (pluginwatcher dials unix://SOCKET without TLS).
func kubeletDial(t *testing.T, socket string) registerapi.RegistrationClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return registerapi.NewRegistrationClient(conn)
}

type running struct {
	srv    *Server
	cancel context.CancelFunc
	done   chan error
}

func start(t *testing.T, cfg Config) *running {
	t.Helper()
	srv, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	l, err := srv.Listen()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{srv: srv, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- srv.Run(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(10 * time.Second):
			t.Error("Run did not return")
		}
	})
	return r
}

func (r *running) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-r.done:
		r.done <- err // for the cleanup
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
		return nil
	}
}

func TestRegistration(t *testing.T) {
	dir := t.TempDir()
	regDir := filepath.Join(dir, "plugins_registry")
	probe := ProbeFileFor(filepath.Join(dir, "plugins", "rawcow.csi.io", "csi.sock"))
	if err := os.MkdirAll(filepath.Dir(probe), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(probe, nil, 0o644); err != nil { // left by an earlier run
		t.Fatal(err)
	}
	r := start(t, Config{
		DriverName:      "rawcow.csi.io",
		Endpoint:        "/var/lib/kubelet/plugins/rawcow.csi.io/csi.sock",
		RegistrationDir: regDir,
		ProbeFile:       probe,
	})
	socket := filepath.Join(regDir, "rawcow.csi.io-reg.sock")
	if r.srv.SocketPath() != socket {
		t.Fatalf("socket %s, want %s", r.srv.SocketPath(), socket)
	}
	st, err := os.Stat(socket)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Type() != fs.ModeSocket || st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want a socket with 0600", st.Mode())
	}
	// A restarted registrar must not look registered before kubelet says so.
	if err := ProbeRegistered(probe); err == nil {
		t.Error("probe passes before kubelet reported a registration")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := kubeletDial(t, socket)
	info, err := c.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != registerapi.CSIPlugin || info.Name != "rawcow.csi.io" ||
		info.Endpoint != "/var/lib/kubelet/plugins/rawcow.csi.io/csi.sock" ||
		len(info.SupportedVersions) != 1 || info.SupportedVersions[0] != "1.0.0" {
		t.Errorf("GetInfo = %+v", info)
	}
	if r.srv.Registered() {
		t.Error("registered before NotifyRegistrationStatus")
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
	if !r.srv.Registered() {
		t.Error("not registered after a successful NotifyRegistrationStatus")
	}
	if err := ProbeRegistered(probe); err != nil {
		t.Error(err)
	}
	if err := Check(ctx, socket, "rawcow.csi.io"); err != nil {
		t.Errorf("Check: %v", err)
	}
	if err := Check(ctx, socket, "other.csi.io"); err == nil {
		t.Error("Check accepts another driver's name")
	}

	r.cancel()
	if err := r.wait(t); err != nil {
		t.Fatalf("Run = %v after cancel, want nil", err)
	}
	if _, err := os.Lstat(socket); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("socket left after stop: %v", err)
	}
	if _, err := os.Lstat(probe); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("probe file left after stop: %v", err)
	}
	if err := Check(ctx, socket, "rawcow.csi.io"); err == nil {
		t.Error("Check passes with the socket gone")
	}
}

// A failed registration ends Run with ErrRegistrationFailed (the process exits, the
// container restarts, kubelet retries), and the socket goes.
func TestRegistrationFailed(t *testing.T) {
	regDir := t.TempDir()
	r := start(t, Config{DriverName: "rawcow.csi.io", Endpoint: "/x/csi.sock", RegistrationDir: regDir})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := kubeletDial(t, r.srv.SocketPath())
	if _, err := c.GetInfo(ctx, &registerapi.InfoRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{
		PluginRegistered: false, Error: "plugin versions not supported",
	}); err != nil {
		t.Fatalf("kubelet's NotifyRegistrationStatus must get an answer: %v", err)
	}
	err := r.wait(t)
	if !errors.Is(err, ErrRegistrationFailed) {
		t.Fatalf("Run = %v, want ErrRegistrationFailed", err)
	}
	if _, err := os.Lstat(r.srv.SocketPath()); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("socket left after a failed registration: %v", err)
	}
}

// A socket left by a killed registrar is replaced; a file that is not a socket is not touched.
func TestStaleSocket(t *testing.T) {
	regDir := t.TempDir()
	socket := SocketPath(regDir, "rawcow.csi.io")
	old, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	old.(*net.UnixListener).SetUnlinkOnClose(false)
	old.Close() // the socket file stays, nobody listens: what SIGKILL leaves
	r := start(t, Config{DriverName: "rawcow.csi.io", Endpoint: "/x/csi.sock", RegistrationDir: regDir})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := Check(ctx, r.srv.SocketPath(), "rawcow.csi.io"); err != nil {
		t.Fatal(err)
	}

	regDir2 := t.TempDir()
	if err := os.WriteFile(SocketPath(regDir2, "rawcow.csi.io"), []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	srv, err := New(Config{DriverName: "rawcow.csi.io", Endpoint: "/x/csi.sock", RegistrationDir: regDir2})
	if err != nil {
		t.Fatal(err)
	}
	if l, err := srv.Listen(); err == nil {
		l.Close()
		t.Error("Listen replaced a regular file")
	}
}

func TestNewRefuses(t *testing.T) {
	for _, cfg := range []Config{
		{Endpoint: "/x/csi.sock", RegistrationDir: "/r"},
		{DriverName: "../evil", Endpoint: "/x/csi.sock", RegistrationDir: "/r"},
		{DriverName: "..", Endpoint: "/x/csi.sock", RegistrationDir: "/r"},
		{DriverName: "d", RegistrationDir: "/r"},
		{DriverName: "d", Endpoint: "relative/csi.sock", RegistrationDir: "/r"},
		{DriverName: "d", Endpoint: "/x/csi.sock"},
	} {
		if _, err := New(cfg); err == nil {
			t.Errorf("New(%+v) accepted", cfg)
		}
	}
}

type identity struct {
	csi.UnimplementedIdentityServer
	name string
}

func (i identity) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: i.name, VendorVersion: "test"}, nil
}

// DriverName waits for a driver that starts after the registrar.
func TestDriverNameWaits(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "csi.sock")
	go func() {
		time.Sleep(500 * time.Millisecond)
		l, err := net.Listen("unix", sock)
		if err != nil {
			t.Error(err)
			return
		}
		g := grpc.NewServer()
		csi.RegisterIdentityServer(g, identity{name: "rawcow.csi.io"})
		t.Cleanup(g.Stop)
		g.Serve(l)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	name, err := DriverName(ctx, "unix://"+sock, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if name != "rawcow.csi.io" {
		t.Errorf("name %q", name)
	}

	ctx2, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	if _, err := DriverName(ctx2, filepath.Join(t.TempDir(), "none.sock"), 100*time.Millisecond); err == nil {
		t.Error("DriverName of a missing driver succeeded")
	}
}
