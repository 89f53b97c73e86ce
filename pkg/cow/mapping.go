package cow

import (
	"fmt"
	"os"
	"runtime/debug"
	"sync"

	"golang.org/x/sys/unix"
)

// Reads from layers that no longer change (frozen layers, snapshots' layers, bases) copy from
// a read-only shared mapping of the file instead of calling pread: at chain depth 128 a 4 KiB
// pread costs about twice a pread of one dense file, and a 1 MiB read of the merged view
// crosses some 200 extents, each a syscall. A copy from a mapped page is a memcpy. The
// mapping shares the page cache with every fd of the file, so what a merge writes into a
// frozen layer, or punches out of it, is what the mapping shows.
//
// A process maps each file once (by device and inode), however many chains read it: a golden
// image under fifty clones is one mapping. Mappings cost page tables where reads touch them:
// one 4 KiB table per 2 MiB region. Reads only touch a layer's data, so a layer's cost is
// bounded by the 2 MiB regions that hold its data (mapSpan), known when it is opened; mapped
// spans are capped per process at mapBudget, and past it layers are read with pread as before.

// mapBudget caps the sum of mapped files' spans (mapSpan): their page tables stay under
// 512 MiB. A variable so tests can lower it.
var mapBudget int64 = 256 << 30

// mapRegion is the span one page table covers.
const mapRegion = 2 << 20

// mapSpan is the bytes of the mapRegion-aligned regions that hold data (extents sorted):
// what reads through a mapping of the file can cover with page tables.
func mapSpan(data []Extent) int64 {
	var span, last int64 = 0, -1 // last: start of the last region counted
	for _, e := range data {
		first := e.Off &^ (mapRegion - 1)
		if first <= last {
			first = last + mapRegion
		}
		if end := e.End(); first < end {
			last = (end - 1) &^ (mapRegion - 1)
			span += last - first + mapRegion
		}
	}
	return span
}

// mapReadMax is the largest piece of a store layer read through its mapping. Such a mapping
// does no read-around (MADV_RANDOM), so a cold piece faults page by page; a larger piece pays
// for its pread, whose readahead serves cold data better.
const mapReadMax = 256 << 10

// mapKey identifies a file whatever path or fd reaches it.
type mapKey struct{ dev, ino uint64 }

// fileMap is one mapped file, its span (mapSpan) and the number of open layers reading
// through it.
type fileMap struct {
	mem  []byte
	span int64
	refs int
}

// mapRegistry holds the mappings of a process.
type mapRegistry struct {
	mu     sync.Mutex
	mapped int64
	files  map[mapKey]*fileMap
}

var fileMaps = mapRegistry{files: map[mapKey]*fileMap{}}

// acquire returns a read-only mapping of all of f, shared with other callers for the same
// file, or nil when f cannot be mapped (empty, over budget, a file system without mmap):
// the caller then reads with pread. Each non-nil result is given back with release.
//
// sparse marks a store layer: its data is scattered blocks, and a fault must read the one
// page it needs (MADV_RANDOM), not the 128 KiB around it that read-around would fill with
// zeros of holes. A base keeps the kernel's read-around: it is mostly dense. span is what the
// mapping counts against mapBudget.
func (r *mapRegistry) acquire(f *os.File, sparse bool, span int64) ([]byte, mapKey) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || st.Size <= 0 {
		return nil, mapKey{}
	}
	key := mapKey{dev: st.Dev, ino: st.Ino}
	r.mu.Lock()
	defer r.mu.Unlock()
	if m := r.files[key]; m != nil {
		m.refs++
		return m.mem, key
	}
	if r.mapped+span > mapBudget {
		return nil, mapKey{}
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(st.Size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, mapKey{}
	}
	if sparse {
		unix.Madvise(mem, unix.MADV_RANDOM) // advice: a failure only costs read-around
	}
	r.files[key] = &fileMap{mem: mem, span: span, refs: 1}
	r.mapped += span
	return mem, key
}

// release gives back a mapping from acquire; the last release unmaps it.
func (r *mapRegistry) release(key mapKey) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.files[key]
	if m == nil {
		return nil
	}
	if m.refs--; m.refs > 0 {
		return nil
	}
	delete(r.files, key)
	r.mapped -= m.span
	if err := unix.Munmap(m.mem); err != nil {
		return fmt.Errorf("unmap layer: %w", err)
	}
	return nil
}

// usage reports the mapped files and their spans (for tests).
func (r *mapRegistry) usage() (files int, span int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.files), r.mapped
}

// layerView is the mapping an immutable open layer reads through, made on its first read.
type layerView struct {
	once sync.Once
	span int64  // mapSpan of the layer's data; its whole size when that is not known
	mem  []byte // nil: read with pread
	key  mapKey
}

func (v *layerView) get(f *os.File, sparse bool) []byte {
	v.once.Do(func() { v.mem, v.key = fileMaps.acquire(f, sparse, v.span) })
	return v.mem
}

// close releases the mapping; no read may be in flight.
func (v *layerView) close() error {
	if v.mem == nil {
		return nil
	}
	v.mem = nil
	return fileMaps.release(v.key)
}

// copyMapped copies src, a part of a mapping, into dst. A page the kernel cannot provide (an
// I/O error, a base truncated behind the store's back) raises SIGBUS; here that becomes an
// error of this read instead of the end of the process.
func copyMapped(dst, src []byte, name string, off int64) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		if _, fault := r.(interface{ Addr() uintptr }); !fault {
			panic(r)
		}
		err = fmt.Errorf("read %s at %d: %w (the mapped file faulted: truncated or unreadable)", name, off, unix.EIO)
	}()
	copy(dst, src)
	return nil
}
