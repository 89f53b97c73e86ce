package blockdev

import (
	"bufio"
	"encoding/json"
	"net"
	"path/filepath"
	"testing"
)

// TestClientCallsRunConcurrently: a call that the server takes long to answer (an attach
// copying a base) must not hold up the client's other calls. The peer here answers list at
// once and attach only when the test lets it, so the order is certain without timing.
func TestClientCallsRunConcurrently(t *testing.T) {
	runDir := t.TempDir()
	l, err := net.Listen("unix", filepath.Join(runDir, ControlSocket))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	received, release := make(chan struct{}), make(chan struct{})
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				sc, enc := bufio.NewScanner(conn), json.NewEncoder(conn)
				for sc.Scan() {
					var req request
					if json.Unmarshal(sc.Bytes(), &req) != nil {
						return
					}
					if req.Op == "attach" {
						close(received)
						<-release
						enc.Encode(response{Attachments: []Attachment{{Name: req.Name, Device: "/dev/loop9"}}})
						continue
					}
					enc.Encode(response{Attachments: []Attachment{{Name: "listed"}}})
				}
			}()
		}
	}()
	c, err := Dial(runDir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	attached := make(chan error, 1)
	go func() {
		_, err := c.Attach("slow", AttachOptions{})
		attached <- err
	}()
	<-received
	as, err := c.List() // blocks for good if calls are serialized
	if err != nil || len(as) != 1 || as[0].Name != "listed" {
		t.Fatalf("list beside a pending attach: %+v, %v", as, err)
	}
	select {
	case err := <-attached:
		t.Fatalf("the attach returned before it was answered: %v", err)
	default:
	}
	close(release)
	if err := <-attached; err != nil {
		t.Fatal(err)
	}
}
