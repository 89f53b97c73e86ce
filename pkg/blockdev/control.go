package blockdev

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// ControlSocket is the name of the control socket in a server's run directory.
const ControlSocket = "control.sock"

// request is one call on the control socket: a JSON object per line, answered by one.
type request struct {
	Op      string            `json:"op"` // attach, detach, snapshot, snapshot-group, clone, resize, list
	Name    string            `json:"name,omitempty"`
	Target  string            `json:"target,omitempty"`  // snapshot or clone name
	Names   []string          `json:"names,omitempty"`   // a group's volumes
	Targets []string          `json:"targets,omitempty"` // their snapshots' names
	Attach  AttachOptions     `json:"attach,omitempty"`
	Size    int64             `json:"size,omitempty"`
	Labels  map[string]string `json:"labels,omitempty"`
}

type response struct {
	Error       string       `json:"error,omitempty"`
	Kind        string       `json:"kind,omitempty"` // the engine sentinel the error wraps
	Attachments []Attachment `json:"attachments,omitempty"`
}

// sentinels travel over the socket by name, so a client can still test errors with errors.Is.
var sentinels = map[string]error{
	"busy": cow.ErrBusy, "notfound": cow.ErrNotFound, "exists": cow.ErrExists,
	"invalidname": cow.ErrInvalidName, "shrink": cow.ErrShrink, "readonly": cow.ErrReadOnly,
	"invalidsize": cow.ErrInvalidSize, "corrupt": cow.ErrCorrupt,
}

// ServeControl listens on runDir/control.sock (root only) and runs requests on s until the
// returned listener is closed.
func (s *Server) ServeControl() (net.Listener, error) {
	path := filepath.Join(s.runDir, ControlSocket)
	os.Remove(path) // a socket left by a dead server
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go s.serveConn(conn)
		}
	}()
	return l, nil
}

func (s *Server) serveConn(conn net.Conn) {
	defer conn.Close()
	sc := bufio.NewScanner(conn)
	enc := json.NewEncoder(conn)
	for sc.Scan() {
		var req request
		var resp response
		if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
			resp.Error = fmt.Sprintf("bad request: %v", err)
		} else {
			var err error
			resp.Attachments, err = s.do(req)
			if err != nil {
				resp.Error = err.Error()
				for kind, e := range sentinels {
					if errors.Is(err, e) {
						resp.Kind = kind
					}
				}
				klog.ErrorS(err, "Control request failed", "op", req.Op, "name", req.Name)
			}
		}
		if enc.Encode(resp) != nil {
			return
		}
	}
}

func (s *Server) do(req request) ([]Attachment, error) {
	switch req.Op {
	case "attach":
		a, err := s.Attach(req.Name, req.Attach)
		if err != nil {
			return nil, err
		}
		return []Attachment{a}, nil
	case "detach":
		return nil, s.Detach(req.Name)
	case "snapshot":
		return nil, s.Snapshot(req.Name, req.Target, req.Labels)
	case "snapshot-group":
		return nil, s.SnapshotGroup(req.Names, req.Targets, req.Labels)
	case "clone":
		return nil, s.Clone(req.Name, req.Target, req.Labels)
	case "resize":
		return nil, s.Resize(req.Name, req.Size)
	case "list":
		return s.List()
	}
	return nil, fmt.Errorf("unknown operation %q", req.Op)
}

// Client talks to a server over its control socket. Calls run concurrently, each on a
// connection of its own (kept for reuse), so that a slow one, an attach that copies a base
// for minutes, does not hold up the others. It reconnects when the server was restarted
// since the last call.
type Client struct {
	runDir string
	mu     sync.Mutex
	idle   []*clientConn
	closed bool
}

type clientConn struct {
	conn net.Conn
	sc   *bufio.Scanner
}

// maxAnswer bounds one answer line: a list of a few thousand attachments.
const maxAnswer = 16 << 20

// ErrNoServer says that no server listens in the run directory.
var ErrNoServer = errors.New("no csi-rawcow server is running")

// Dial connects to the server of runDir.
func Dial(runDir string) (*Client, error) {
	c := &Client{runDir: runDir}
	cc, err := c.connect()
	if err != nil {
		return nil, err
	}
	c.idle = append(c.idle, cc)
	return c, nil
}

func (c *Client) connect() (*clientConn, error) {
	path := filepath.Join(c.runDir, ControlSocket)
	conn, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("%w (no %s: %v); start one with `csi-rawcow serve`", ErrNoServer, path, err)
	}
	sc := bufio.NewScanner(conn)
	sc.Buffer(make([]byte, 0, 64<<10), maxAnswer)
	return &clientConn{conn: conn, sc: sc}, nil
}

// Close closes the idle connections; those of calls under way close when they return.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	for _, cc := range c.idle {
		errs = append(errs, cc.conn.Close())
	}
	c.idle, c.closed = nil, true
	return errors.Join(errs...)
}

// take returns an idle connection, or a new one (fresh true).
func (c *Client) take() (cc *clientConn, fresh bool, err error) {
	c.mu.Lock()
	if n := len(c.idle); n > 0 {
		cc = c.idle[n-1]
		c.idle = c.idle[:n-1]
	}
	c.mu.Unlock()
	if cc != nil {
		return cc, false, nil
	}
	cc, err = c.connect()
	return cc, true, err
}

func (c *Client) put(cc *clientConn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		cc.conn.Close()
		return
	}
	c.idle = append(c.idle, cc)
}

func (c *Client) call(req request) ([]Attachment, error) {
	line, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	line = append(line, '\n')
	// A request that could not be sent was not run: an idle connection may be to a server
	// that has gone since; send it once more on a new one.
	var cc *clientConn
	for {
		var fresh bool
		if cc, fresh, err = c.take(); err != nil {
			return nil, err
		}
		if _, err = cc.conn.Write(line); err == nil {
			break
		}
		cc.conn.Close()
		if fresh {
			return nil, fmt.Errorf("control socket: %w", err)
		}
	}
	if !cc.sc.Scan() {
		err := cc.sc.Err()
		cc.conn.Close()
		return nil, fmt.Errorf("control socket: no answer from the server: %v", err)
	}
	var resp response
	err = json.Unmarshal(cc.sc.Bytes(), &resp)
	c.put(cc)
	if err != nil {
		return nil, fmt.Errorf("control socket: bad answer: %w", err)
	}
	if resp.Error != "" {
		if e := sentinels[resp.Kind]; e != nil {
			return nil, fmt.Errorf("%s: %w", resp.Error, e)
		}
		return nil, errors.New(resp.Error)
	}
	return resp.Attachments, nil
}

// Attach asks the server to attach a volume or snapshot; see Server.Attach.
func (c *Client) Attach(name string, opts AttachOptions) (Attachment, error) {
	as, err := c.call(request{Op: "attach", Name: name, Attach: opts})
	if err != nil {
		return Attachment{}, err
	}
	if len(as) != 1 {
		return Attachment{}, fmt.Errorf("control socket: attach answered %d attachments", len(as))
	}
	return as[0], nil
}

// Detach asks the server to detach name.
func (c *Client) Detach(name string) error {
	_, err := c.call(request{Op: "detach", Name: name})
	return err
}

// Snapshot asks the server to snapshot volume as snap.
func (c *Client) Snapshot(volume, snap string, labels map[string]string) error {
	_, err := c.call(request{Op: "snapshot", Name: volume, Target: snap, Labels: labels})
	return err
}

// SnapshotGroup asks the server to snapshot volumes[i] as snaps[i], all at one point in time.
func (c *Client) SnapshotGroup(volumes, snaps []string, labels map[string]string) error {
	_, err := c.call(request{Op: "snapshot-group", Names: volumes, Targets: snaps, Labels: labels})
	return err
}

// Clone asks the server to clone src as name.
func (c *Client) Clone(src, name string, labels map[string]string) error {
	_, err := c.call(request{Op: "clone", Name: src, Target: name, Labels: labels})
	return err
}

// Resize asks the server to grow volume to size bytes.
func (c *Client) Resize(volume string, size int64) error {
	_, err := c.call(request{Op: "resize", Name: volume, Size: size})
	return err
}

// List returns the server's attachments.
func (c *Client) List() ([]Attachment, error) {
	return c.call(request{Op: "list"})
}
