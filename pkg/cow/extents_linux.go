package cow

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Extent is a byte range [Off, Off+Len) of a file.
type Extent struct{ Off, Len int64 }

// End returns the first byte after the extent.
func (e Extent) End() int64 { return e.Off + e.Len }

// FIEMAP ABI (include/uapi/linux/fiemap.h, include/uapi/linux/fs.h); x/sys/unix
// does not define it.
const (
	fsIocFiemap = 0xC020660B // _IOWR('f', 11, struct fiemap)

	fiemapFlagSync = 0x00000001

	fiemapExtentLast      = 0x00000001
	fiemapExtentUnwritten = 0x00000800
	// Extents whose physical offset says nothing: location unknown, delayed allocation,
	// data inline in metadata.
	fiemapExtentNoPhysical = 0x00000002 | 0x00000004 | 0x00000200

	// fiemapBatch is the number of extents fetched per ioctl: 1024 * 56 bytes.
	fiemapBatch = 1024
)

// fiemap is struct fiemap with a fixed array of extents in place of the
// flexible array member fm_extents[].
type fiemap struct {
	start         uint64 // fm_start: first logical byte to map
	length        uint64 // fm_length: number of bytes to map
	flags         uint32 // fm_flags: FIEMAP_FLAG_*
	mappedExtents uint32 // fm_mapped_extents: filled in by the kernel
	extentCount   uint32 // fm_extent_count: capacity of extents
	_             uint32 // fm_reserved
	extents       [fiemapBatch]fiemapExtent
}

// fiemapExtent is struct fiemap_extent.
type fiemapExtent struct {
	logical  uint64 // fe_logical
	physical uint64 // fe_physical
	length   uint64 // fe_length
	_        [2]uint64
	flags    uint32 // fe_flags: FIEMAP_EXTENT_*
	_        [3]uint32
}

// Compile-time checks of the layout the kernel expects.
var (
	_ [32]byte = [unsafe.Offsetof(fiemap{}.extents)]byte{}
	_ [56]byte = [unsafe.Sizeof(fiemapExtent{})]byte{}
)

// struct fsxattr and its ioctls (include/uapi/linux/fs.h); x/sys/unix has no
// Linux definition of them.
const (
	fsIocFsgetxattr = 0x801C581F // _IOR('X', 31, struct fsxattr)
	fsIocFssetxattr = 0x401C5820 // _IOW('X', 32, struct fsxattr)

	fsXflagExtsize      = 0x00000800
	fsXflagExtszinherit = 0x00001000
	fsXflagExtsizeFlags = fsXflagExtsize | fsXflagExtszinherit
	fsxattrSize         = 28
)

// fsxattr is struct fsxattr.
type fsxattr struct {
	xflags     uint32 // fsx_xflags
	extsize    uint32 // fsx_extsize, bytes
	nextents   uint32 // fsx_nextents
	projid     uint32 // fsx_projid
	cowextsize uint32 // fsx_cowextsize
	_          [8]byte
}

var _ [fsxattrSize]byte = [unsafe.Sizeof(fsxattr{})]byte{}

// ioctlPtr runs ioctl(fd, req, p), retrying on EINTR, while keeping f open.
func ioctlPtr(f *os.File, req uintptr, p unsafe.Pointer) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var errno unix.Errno
	cerr := rc.Control(func(fd uintptr) {
		for {
			_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, req, uintptr(p))
			if errno != unix.EINTR {
				return
			}
		}
	})
	if cerr != nil {
		return cerr
	}
	if errno != 0 {
		return errno
	}
	return nil
}

// isUnsupported reports whether err says an ioctl or operation is not implemented
// by the file system.
func isUnsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTTY)
}

// appendCoalesced appends [off, end) to list, merging it with the last extent when
// they touch or overlap. Ranges must arrive sorted by offset.
func appendCoalesced(list []Extent, off, end int64) []Extent {
	if n := len(list); n > 0 {
		last := &list[n-1]
		if off <= last.End() {
			if end > last.End() {
				last.Len = end - last.Off
			}
			return list
		}
	}
	return append(list, Extent{Off: off, Len: end - off})
}

// fiemapExtents maps [0, size) of f with FS_IOC_FIEMAP in one walk and returns,
// each sorted, coalesced and clipped, the written extents (every extent not
// flagged FIEMAP_EXTENT_UNWRITTEN) and the unwritten ones. It returns an error
// satisfying isUnsupported when the file system has no FIEMAP.
func fiemapExtents(f *os.File, size int64) (data, unwritten []Extent, err error) {
	err = fiemapWalk(f, size, func(off, end, _ int64, flags uint32) {
		if flags&fiemapExtentUnwritten != 0 {
			unwritten = appendCoalesced(unwritten, off, end)
		} else {
			data = appendCoalesced(data, off, end)
		}
	})
	if err != nil {
		return nil, nil, err
	}
	return data, unwritten, nil
}

// fiemapWalk calls fn for every extent of [0, size) of f, in order, clipped to size, with
// its physical offset and FIEMAP flags. The file is synced (FIEMAP_FLAG_SYNC) by the first
// ioctl, so dirty page cache is mapped as it will be on disk; later ioctls of the same walk
// do not sync again.
func fiemapWalk(f *os.File, size int64, fn func(off, end, phys int64, flags uint32)) error {
	if size <= 0 {
		return nil
	}
	fm := new(fiemap)
	next := int64(0)
	flags := uint32(fiemapFlagSync)
	for next < size {
		fm.start = uint64(next)
		fm.length = uint64(size - next)
		fm.flags = flags
		fm.mappedExtents = 0
		fm.extentCount = fiemapBatch
		if err := ioctlPtr(f, fsIocFiemap, unsafe.Pointer(fm)); err != nil {
			return err
		}
		flags = 0
		n := int(fm.mappedExtents)
		if n == 0 {
			break
		}
		if n > fiemapBatch {
			return fmt.Errorf("kernel mapped %d extents into a buffer of %d", n, fiemapBatch)
		}
		prev := next
		last := false
		for i := range fm.extents[:n] {
			fe := &fm.extents[i]
			off := int64(fe.logical)
			end := off + int64(fe.length)
			if fe.flags&fiemapExtentLast != 0 {
				last = true
			}
			if end > next {
				next = end
			}
			end = min(end, size)
			if end <= off {
				continue
			}
			fn(off, end, int64(fe.physical), fe.flags)
		}
		if last || next <= prev {
			break
		}
	}
	return nil
}

// physExtent is a written extent of a file and where its data lies on the device.
type physExtent struct {
	Extent
	phys int64
}

// physicalExtents returns the written extents of f with their physical offsets, for files
// on file systems that share blocks: two extents with the same physical offset hold the
// same data, whatever was done to either file since one was cloned from the other.
func physicalExtents(f *os.File, size int64) ([]physExtent, error) {
	var out []physExtent
	err := fiemapWalk(f, size, func(off, end, phys int64, flags uint32) {
		switch {
		case flags&fiemapExtentUnwritten != 0:
		case flags&fiemapExtentNoPhysical != 0:
			out = append(out, physExtent{Extent{Off: off, Len: end - off}, -1}) // equal to nothing
		default:
			out = append(out, physExtent{Extent{Off: off, Len: end - off}, phys})
		}
	})
	return out, err
}

// seekDataIn maps the data of f within [start, size) with SEEK_DATA/SEEK_HOLE.
// Unwritten extents read as holes there.
func seekDataIn(f *os.File, start, size int64) ([]Extent, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var out []Extent
	var serr error
	cerr := rc.Control(func(fd uintptr) {
		off := start
		for off < size {
			data, err := unix.Seek(int(fd), off, unix.SEEK_DATA)
			if err == unix.ENXIO {
				return
			}
			if err != nil {
				serr = fmt.Errorf("SEEK_DATA at %d: %w", off, err)
				return
			}
			if data >= size {
				return
			}
			hole, err := unix.Seek(int(fd), data, unix.SEEK_HOLE)
			if err == unix.ENXIO {
				// Truncated under us: nothing from data on.
				return
			}
			if err != nil {
				serr = fmt.Errorf("SEEK_HOLE at %d: %w", data, err)
				return
			}
			if hole <= data {
				serr = fmt.Errorf("SEEK_HOLE at %d returned %d", data, hole)
				return
			}
			out = appendCoalesced(out, data, min(hole, size))
			off = hole
		}
	})
	if cerr != nil {
		return nil, cerr
	}
	return out, serr
}

// dataExtents returns the ranges of f that hold written data, sorted, adjacent or
// overlapping ones coalesced, clipped to [0, size). UNWRITTEN extents (allocated,
// reading zero) are not data; every other extent (DELALLOC, UNKNOWN, ENCODED,
// SHARED, INLINE, ...) is. It uses FS_IOC_FIEMAP with FIEMAP_FLAG_SYNC and falls
// back to SEEK_DATA/SEEK_HOLE where FIEMAP is unsupported (tmpfs, NFS).
func dataExtents(f *os.File, size int64) ([]Extent, error) {
	data, _, err := layerExtents(f, size)
	return data, err
}

// unwrittenExtents returns the UNWRITTEN extents of f within [0, size), sorted,
// coalesced and clipped (FIEMAP with FIEMAP_FLAG_SYNC). Where FIEMAP is
// unsupported it returns nil without error: such a file system (tmpfs) has no
// unwritten state that could survive a crash.
func unwrittenExtents(f *os.File, size int64) ([]Extent, error) {
	_, unwritten, err := fiemapExtents(f, size)
	if isUnsupported(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("fiemap %s: %w", f.Name(), err)
	}
	return unwritten, nil
}

// layerExtents returns what dataExtents and unwrittenExtents return, from a single
// FIEMAP walk: the walk is the whole cost (about 0.5 us per extent on ext4 and
// xfs, 2 us on btrfs), so a caller that needs both should call this once.
func layerExtents(f *os.File, size int64) (data, unwritten []Extent, err error) {
	data, unwritten, err = fiemapExtents(f, size)
	if isUnsupported(err) {
		data, err = seekDataIn(f, 0, size)
		if err != nil {
			return nil, nil, fmt.Errorf("seek data %s: %w", f.Name(), err)
		}
		return data, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("fiemap %s: %w", f.Name(), err)
	}
	return data, unwritten, nil
}

// punchHole deallocates [off, off+n) of f, keeping its size
// (FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE). Partial blocks at either end are
// zeroed rather than deallocated by the file system. n <= 0 is a no-op.
func punchHole(f *os.File, off, n int64) error {
	if n <= 0 {
		return nil
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("punch hole %s [%d,+%d): %w", f.Name(), off, n, err)
	}
	cerr := rc.Control(func(fd uintptr) {
		for {
			err = unix.Fallocate(int(fd), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
			if err != unix.EINTR {
				return
			}
		}
	})
	if cerr != nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("punch hole %s [%d,+%d): %w", f.Name(), off, n, err)
	}
	return nil
}

// getFsxattr reads f's struct fsxattr. ok is false where the ioctl is unsupported.
func getFsxattr(f *os.File) (fa fsxattr, ok bool, err error) {
	err = ioctlPtr(f, fsIocFsgetxattr, unsafe.Pointer(&fa))
	if isUnsupported(err) || errors.Is(err, unix.EINVAL) {
		return fsxattr{}, false, nil
	}
	if err != nil {
		return fsxattr{}, false, err
	}
	return fa, true, nil
}

// extentSizeHint returns the XFS extent size hint of f in bytes: fsx_extsize when
// FS_XFLAG_EXTSIZE or FS_XFLAG_EXTSZINHERIT is set (FS_IOC_FSGETXATTR), otherwise 0.
// It returns 0 where the ioctl is unsupported (ENOTTY, EOPNOTSUPP, EINVAL).
func extentSizeHint(f *os.File) (int64, error) {
	fa, ok, err := getFsxattr(f)
	if err != nil {
		return 0, fmt.Errorf("get fsxattr %s: %w", f.Name(), err)
	}
	if !ok || fa.xflags&fsXflagExtsizeFlags == 0 {
		return 0, nil
	}
	return int64(fa.extsize), nil
}

// clearExtentSizeHint clears FS_XFLAG_EXTSIZE, FS_XFLAG_EXTSZINHERIT and
// fsx_extsize on f (FS_IOC_FSSETXATTR). It is a no-op where there is no hint or the
// ioctl is unsupported. XFS refuses (EINVAL) to change the hint of a file that
// already has extents, so call it on a freshly created empty file.
func clearExtentSizeHint(f *os.File) error {
	fa, ok, err := getFsxattr(f)
	if err != nil {
		return fmt.Errorf("get fsxattr %s: %w", f.Name(), err)
	}
	if !ok || (fa.xflags&fsXflagExtsizeFlags == 0 && fa.extsize == 0) {
		return nil
	}
	fa.xflags &^= fsXflagExtsizeFlags
	fa.extsize = 0
	err = ioctlPtr(f, fsIocFssetxattr, unsafe.Pointer(&fa))
	if isUnsupported(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("clear extent size hint %s: %w", f.Name(), err)
	}
	return nil
}
