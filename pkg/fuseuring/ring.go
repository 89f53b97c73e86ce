// Package fuseuring carries FUSE requests over io_uring (Linux 6.14+, "FUSE-over-io-uring")
// instead of read(2) and write(2) on /dev/fuse: one ring per CPU, served by one thread pinned
// to that CPU, each request arriving in a buffer the server registered and its reply going back
// with the same io_uring command that fetches the next request. A request costs no syscall of
// its own when the ring is busy, and it is served on the CPU that issued it.
//
// The package knows the transport only; what a request means is the Handler's business.
// The FUSE connection is set up elsewhere (go-fuse mounts it and answers FUSE_INIT, which
// must carry FUSE_OVER_IO_URING); Start registers the rings on its /dev/fuse descriptor.
// Requests the kernel still sends through /dev/fuse (FORGET, INTERRUPT, and everything
// before every CPU's ring is registered) stay with the reader of /dev/fuse.
package fuseuring

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// EnableParam is the fuse module's switch for the io_uring transport; the kernel ignores
// FUSE_OVER_IO_URING in FUSE_INIT while it is off.
const EnableParam = "/sys/module/fuse/parameters/enable_uring"

// Enable turns the kernel's io_uring transport on (root only). It changes nothing for FUSE
// servers that do not ask for it in FUSE_INIT.
func Enable() error {
	b, err := os.ReadFile(EnableParam)
	if err != nil {
		return fmt.Errorf("fuse io_uring: this kernel has no %s: %w", EnableParam, err)
	}
	if strings.TrimSpace(string(b)) == "Y" {
		return nil
	}
	if err := os.WriteFile(EnableParam, []byte("1"), 0o644); err != nil {
		return fmt.Errorf("fuse io_uring: enable: %w", err)
	}
	return nil
}

// The kernel ABI (include/uapi/linux/fuse.h, io_uring.h).
const (
	cmdRegister       = 1 // FUSE_IO_URING_CMD_REGISTER
	cmdCommitAndFetch = 2 // FUSE_IO_URING_CMD_COMMIT_AND_FETCH

	opPollAdd  = 6  // IORING_OP_POLL_ADD
	opURingCmd = 46 // IORING_OP_URING_CMD
	pollMulti  = 1  // IORING_POLL_ADD_MULTI
	cqeFMore   = 2  // IORING_CQE_F_MORE: a multishot request stays armed

	setupCQSize    = 1 << 3  // IORING_SETUP_CQSIZE
	setupSubmitAll = 1 << 7  // IORING_SETUP_SUBMIT_ALL
	setupSQE128    = 1 << 10 // IORING_SETUP_SQE128
	enterGetEvents = 1       // IORING_ENTER_GETEVENTS
	offSQRing      = 0
	offCQRing      = 0x8000000
	offSQEs        = 0x10000000

	sqeSize = 128 // SQE128: the command area is 80 bytes from offset 48
	cqeSize = 16

	headerSize  = 128 + 128 + 32 // struct fuse_uring_req_header
	inOutOffset = 0
	opInOffset  = 128
	opInSize    = 128
	entOffset   = 256 // struct fuse_uring_ent_in_out
	iovOffset   = 1024
	headerAlloc = 4096 // page aligned: the kernel pins it
)

// ringParams is struct io_uring_params.
type ringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFd uint32
	resv                                                                   [3]uint32
	sqOff                                                                  struct {
		head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
		userAddr                                                        uint64
	}
	cqOff struct {
		head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
		userAddr                                                        uint64
	}
}

// entOut is struct fuse_uring_ent_in_out.
type entOut struct {
	flags, commitID    uint64
	payloadSz, padding uint32
	reserved           uint64
}

// A Request is one FUSE request in a ring entry. It is valid until Reply.
type Request struct {
	// Header is the request's fuse_in_header.
	Header *fuse.InHeader
	// Payload holds the request's data after its per-op header: a write's data, a lookup's
	// name. The reply's payload is written into Buf, which shares its memory.
	Payload []byte
	// Buf is the whole payload buffer (the mount's max_write at least), for the reply.
	Buf []byte

	e     *entry
	input [(unsafe.Sizeof(fuse.InHeader{}) + opInSize) / 8]uint64 // words: the inputs hold uint64s
}

// Input returns the request's header and its per-op header side by side, the layout of
// go-fuse's input types (which embed InHeader): cast it to the op's *fuse.XxxIn.
func (r *Request) Input() unsafe.Pointer {
	in := unsafe.Slice((*byte)(unsafe.Pointer(&r.input[0])), unsafe.Sizeof(r.input))
	n := copy(in, unsafe.Slice((*byte)(unsafe.Pointer(r.Header)), unsafe.Sizeof(fuse.InHeader{})))
	copy(in[n:], r.e.header[opInOffset:opInOffset+opInSize])
	return unsafe.Pointer(&r.input[0])
}

// Reply sends the first n bytes of Buf as the reply's payload, or errno alone when it is not
// zero, and gives the entry back to the kernel for the next request. It may be called from
// any goroutine, once per request.
func (r *Request) Reply(n int, errno syscall.Errno) {
	if errno != 0 {
		n = 0
	}
	r.e.q.commit(r.e, n, errno)
}

// A Handler serves a request and calls its Reply, before it returns or later from another
// goroutine (for requests that may block, such as fsync: the queue's thread serves the
// next request meanwhile only if the handler hands such work off).
type Handler func(r *Request)

// Options size the rings.
type Options struct {
	// Depth is the number of entries per CPU: requests served at once on one CPU.
	Depth int
	// PayloadSize is each entry's payload buffer: at least the mount's max_write.
	PayloadSize int
}

// Rings are the io_uring queues of one FUSE connection, one per possible CPU.
type Rings struct {
	queues []*queue
	wg     sync.WaitGroup
}

// Start registers a ring per possible CPU on devFd, the /dev/fuse descriptor of a connection
// whose FUSE_INIT reply carried FUSE_OVER_IO_URING, and serves the requests that arrive on
// them with h. It fails if the kernel refuses a registration (the transport is off, or the
// connection did not ask for it); the rings registered so far are closed again then. A
// connection that asked for rings holds every request until all are registered: the caller
// unmounts it then.
func Start(devFd int, h Handler, opts Options) (*Rings, error) {
	cpus, err := possibleCPUs()
	if err != nil {
		return nil, err
	}
	rs := &Rings{}
	for qid := 0; qid < cpus; qid++ {
		q := &queue{qid: qid, fd: -1, wake: -1, devFd: devFd, handler: h, depth: opts.Depth, payloadSize: opts.PayloadSize}
		started := make(chan error, 1)
		rs.wg.Add(1)
		go func() {
			defer rs.wg.Done()
			q.run(started)
		}()
		if err := <-started; err != nil {
			rs.Close()
			return nil, fmt.Errorf("fuse io_uring: queue %d: %w", qid, err)
		}
		rs.queues = append(rs.queues, q)
	}
	return rs, nil
}

// Close waits for the replies handlers still owe, stops every queue's thread and closes the
// rings; the kernel cancels the entries still registered. After an unmount the threads have
// ended already, each once the kernel returned all its entries.
func (rs *Rings) Close() {
	for _, q := range rs.queues {
		q.stop()
	}
	rs.wg.Wait()
}

func possibleCPUs() (int, error) {
	b, err := os.ReadFile("/sys/devices/system/cpu/possible")
	if err != nil {
		return 0, fmt.Errorf("fuse io_uring: %w", err)
	}
	s := strings.TrimSpace(string(b))
	last := s[strings.LastIndexAny(s, ",-")+1:]
	var n int
	if _, err := fmt.Sscanf(last, "%d", &n); err != nil {
		return 0, fmt.Errorf("fuse io_uring: possible CPUs %q: %w", s, err)
	}
	return n + 1, nil
}

// entry is one registered request buffer of a queue.
type entry struct {
	q        *queue
	idx      int
	header   []byte // headerAlloc bytes: fuse_uring_req_header, then the iovecs
	payload  []byte
	commitID uint64
	cmd      uint32 // the last command submitted for it
	req      Request
}

func (e *entry) ent() *entOut { return (*entOut)(unsafe.Pointer(&e.header[entOffset])) }

// queue is the ring of one CPU. Its thread waits for completions and serves requests; any
// goroutine may queue a submission (a deferred reply) under mu.
type queue struct {
	qid, devFd, depth, payloadSize int
	handler                        Handler

	fd             int
	sqRing, cqRing []byte
	sqes           []byte
	sqHead, sqTail *uint32
	sqMask         uint32
	sqArray        unsafe.Pointer
	cqHead, cqTail *uint32
	cqMask         uint32
	cqes           unsafe.Pointer
	entries        []*entry
	serving        atomic.Bool // the thread is in a handler
	stopping       atomic.Bool
	inflight       sync.WaitGroup // requests handed to the handler and not answered yet
	wake           int            // eventfd: replies queued from other goroutines, or stop
	mu             sync.Mutex     // guards the submission queue's tail and closed
	closed         bool
}

// wakeData marks the completions of the wake eventfd's poll.
const wakeData = ^uint64(0)

func (q *queue) run(started chan<- error) {
	// Completions of a ring's commands run as task work of the thread that waits on it, and
	// the kernel hands a request to the ring of the CPU it was issued on: one thread per
	// ring, on that CPU.
	// The thread is never unlocked: it ends with the goroutine, pinning and all.
	runtime.LockOSThread()
	var set unix.CPUSet
	set.Set(q.qid)
	unix.SchedSetaffinity(0, &set) //nolint:errcheck // an offline CPU: the ring works unpinned
	if err := q.setup(); err != nil {
		q.release()
		started <- err
		return
	}
	// A refused registration completes at once; a good one only when a request comes.
	if err := q.register(); err != nil {
		q.release()
		started <- err
		return
	}
	started <- nil
	q.loop()
	q.release()
}

func (q *queue) setup() error {
	var err error
	if q.wake, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return fmt.Errorf("eventfd: %w", err)
	}
	p := ringParams{flags: setupSQE128 | setupCQSize | setupSubmitAll, cqEntries: uint32(2 * (q.depth + 1))}
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(q.depth+1), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return fmt.Errorf("io_uring_setup: %w", errno)
	}
	q.fd = int(fd)
	sqLen := int(p.sqOff.array + p.sqEntries*4)
	if q.sqRing, err = unix.Mmap(q.fd, offSQRing, sqLen, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("mmap SQ ring: %w", err)
	}
	cqLen := int(p.cqOff.cqes + p.cqEntries*cqeSize)
	if q.cqRing, err = unix.Mmap(q.fd, offCQRing, cqLen, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("mmap CQ ring: %w", err)
	}
	if q.sqes, err = unix.Mmap(q.fd, offSQEs, int(p.sqEntries)*sqeSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("mmap SQEs: %w", err)
	}
	at := func(b []byte, off uint32) unsafe.Pointer { return unsafe.Pointer(&b[off]) }
	q.sqHead, q.sqTail = (*uint32)(at(q.sqRing, p.sqOff.head)), (*uint32)(at(q.sqRing, p.sqOff.tail))
	q.sqMask = *(*uint32)(at(q.sqRing, p.sqOff.ringMask))
	q.sqArray = at(q.sqRing, p.sqOff.array)
	q.cqHead, q.cqTail = (*uint32)(at(q.cqRing, p.cqOff.head)), (*uint32)(at(q.cqRing, p.cqOff.tail))
	q.cqMask = *(*uint32)(at(q.cqRing, p.cqOff.ringMask))
	q.cqes = at(q.cqRing, p.cqOff.cqes)
	for i := 0; i < q.depth; i++ {
		e := &entry{q: q, idx: i}
		if e.header, err = unix.Mmap(-1, 0, headerAlloc, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
			return fmt.Errorf("entry buffer: %w", err)
		}
		q.entries = append(q.entries, e)
		if e.payload, err = unix.Mmap(-1, 0, q.payloadSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
			return fmt.Errorf("entry buffer: %w", err)
		}
		iov := (*[2]unix.Iovec)(unsafe.Pointer(&e.header[iovOffset]))
		iov[0].Base, iov[0].Len = &e.header[0], headerSize
		iov[1].Base, iov[1].Len = &e.payload[0], uint64(len(e.payload))
		e.req = Request{Header: (*fuse.InHeader)(unsafe.Pointer(&e.header[inOutOffset])), Buf: e.payload, e: e}
	}
	return nil
}

// register submits every entry's REGISTER command and checks that none came back refused.
func (q *queue) register() error {
	q.mu.Lock()
	for _, e := range q.entries {
		q.putCmd(e, cmdRegister)
	}
	q.putWakePoll()
	n := q.unsubmitted()
	q.mu.Unlock()
	if _, err := q.enter(n, 0, 0); err != nil {
		return fmt.Errorf("register: %w", err)
	}
	// Completions with a request (the last queue's registration makes the rings ready) stay
	// for the loop.
	for head, tail := *q.cqHead, atomic.LoadUint32(q.cqTail); head != tail; head++ {
		if res := q.cqe(head).res; res < 0 {
			return fmt.Errorf("register: %w", syscall.Errno(-res))
		}
	}
	return nil
}

type cqe struct {
	userData uint64
	res      int32
	flags    uint32
}

func (q *queue) cqe(i uint32) *cqe {
	return (*cqe)(unsafe.Add(q.cqes, uintptr(i&q.cqMask)*cqeSize))
}

func (q *queue) loop() {
	live := q.depth // entries the kernel may still complete
	for live > 0 {
		q.mu.Lock()
		n := q.unsubmitted()
		q.mu.Unlock()
		if _, err := q.enter(n, 1, enterGetEvents); err != nil && !errors.Is(err, syscall.EINTR) {
			return
		}
		head, tail := *q.cqHead, atomic.LoadUint32(q.cqTail)
		for ; head != tail; head++ {
			c := *q.cqe(head)
			if c.userData == wakeData {
				var b [8]byte
				unix.Read(q.wake, b[:]) //nolint:errcheck // only resets the counter
				if q.stopping.Load() {
					atomic.StoreUint32(q.cqHead, head+1)
					return
				}
				if c.flags&cqeFMore == 0 {
					q.mu.Lock()
					q.putWakePoll()
					q.mu.Unlock()
				}
				continue
			}
			e := q.entries[c.userData]
			switch {
			case c.res == 0:
				q.serve(e)
			case c.res == -int32(syscall.EINTR) || c.res == -int32(syscall.EAGAIN):
				q.mu.Lock()
				q.putCmd(e, e.cmd)
				q.mu.Unlock()
			default: // the connection ended (ENOTCONN) or the entry was cancelled
				live--
			}
		}
		atomic.StoreUint32(q.cqHead, head)
	}
}

func (q *queue) serve(e *entry) {
	eo := e.ent()
	e.commitID = eo.commitID
	e.req.Payload = e.payload[:eo.payloadSz]
	q.inflight.Add(1)
	q.serving.Store(true)
	q.handler(&e.req)
	q.serving.Store(false)
}

// commit writes e's reply header and queues it with the fetch of e's next request, for the
// queue's thread to submit. Only that thread submits: the kernel hands the next request of
// an entry to the thread that submitted its fetch, as task work that runs when that thread
// next enters or leaves the kernel; a goroutine's thread may by then be asleep in a read of
// the very device waiting for that request.
func (q *queue) commit(e *entry, n int, errno syscall.Errno) {
	defer q.inflight.Done()
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return
	}
	out := (*fuse.OutHeader)(unsafe.Pointer(&e.header[inOutOffset]))
	out.Unique = e.req.Header.Unique
	out.Status = -int32(errno)
	out.Length = uint32(unsafe.Sizeof(fuse.OutHeader{})) + uint32(n)
	e.ent().payloadSz = uint32(n)
	q.putCmd(e, cmdCommitAndFetch)
	// While the queue's thread serves a request, it submits what is queued before it waits
	// again (it takes mu for that, so it sees this command); otherwise it may be waiting.
	wake := !q.serving.Load()
	q.mu.Unlock()
	if wake {
		q.signal()
	}
}

func (q *queue) signal() {
	one := [8]byte{1}
	unix.Write(q.wake, one[:]) //nolint:errcheck // a full counter wakes the thread as well
}

// putWakePoll arms a multishot poll of the wake eventfd. q.mu held.
func (q *queue) putWakePoll() {
	tail := *q.sqTail
	i := tail & q.sqMask
	sqe := q.sqes[int(i)*sqeSize : int(i+1)*sqeSize]
	clear(sqe)
	sqe[0] = opPollAdd
	*(*int32)(unsafe.Pointer(&sqe[4])) = int32(q.wake)
	*(*uint32)(unsafe.Pointer(&sqe[24])) = pollMulti
	*(*uint32)(unsafe.Pointer(&sqe[28])) = unix.POLLIN
	*(*uint64)(unsafe.Pointer(&sqe[32])) = wakeData
	q.push(i, tail)
}

// putCmd writes a uring command for e into the next SQE. q.mu held.
func (q *queue) putCmd(e *entry, cmd uint32) {
	tail := *q.sqTail
	i := tail & q.sqMask
	sqe := q.sqes[int(i)*sqeSize : int(i+1)*sqeSize]
	clear(sqe)
	sqe[0] = opURingCmd
	*(*int32)(unsafe.Pointer(&sqe[4])) = int32(q.devFd)
	*(*uint32)(unsafe.Pointer(&sqe[8])) = cmd
	e.cmd = cmd
	*(*uint64)(unsafe.Pointer(&sqe[32])) = uint64(e.idx)
	if cmd == cmdRegister {
		*(*uint64)(unsafe.Pointer(&sqe[16])) = uint64(uintptr(unsafe.Pointer(&e.header[iovOffset])))
		*(*uint32)(unsafe.Pointer(&sqe[24])) = 2
	} else {
		*(*uint64)(unsafe.Pointer(&sqe[48+8])) = e.commitID
	}
	*(*uint16)(unsafe.Pointer(&sqe[48+16])) = uint16(q.qid)
	q.push(i, tail)
}

func (q *queue) push(i, tail uint32) {
	*(*uint32)(unsafe.Add(q.sqArray, uintptr(i)*4)) = i
	atomic.StoreUint32(q.sqTail, tail+1)
}

// unsubmitted counts the SQEs queued and not yet consumed by the kernel. q.mu held.
func (q *queue) unsubmitted() uint32 { return *q.sqTail - atomic.LoadUint32(q.sqHead) }

func (q *queue) enter(toSubmit, minComplete, flags uint32) (int, error) {
	n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(q.fd), uintptr(toSubmit), uintptr(minComplete), uintptr(flags), 0, 0)
	if errno != 0 {
		return int(n), errno
	}
	return int(n), nil
}

// stop ends the queue's thread.
func (q *queue) stop() {
	q.stopping.Store(true)
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.closed && q.wake >= 0 {
		q.signal()
	}
}

// release waits for the requests handlers still hold, closes the ring (the kernel cancels
// what is still registered) and frees the buffers.
func (q *queue) release() {
	q.inflight.Wait()
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	if q.fd >= 0 {
		unix.Close(q.fd)
	}
	if q.wake >= 0 {
		unix.Close(q.wake)
	}
	for _, b := range [][]byte{q.sqRing, q.cqRing, q.sqes} {
		if b != nil {
			unix.Munmap(b)
		}
	}
	for _, e := range q.entries {
		if e.header != nil {
			unix.Munmap(e.header)
		}
		if e.payload != nil {
			unix.Munmap(e.payload)
		}
	}
}
