package cow

import "errors"

// Errors callers can test with errors.Is. Every returned error wraps one of them where it
// applies and says which volume, layer or file it is about.
var (
	ErrInvalidName   = errors.New("invalid name")
	ErrNotFound      = errors.New("not found")
	ErrExists        = errors.New("already exists")
	ErrBusy          = errors.New("in use")
	ErrShrink        = errors.New("shrinking is not supported")
	ErrReadOnly      = errors.New("read-only")
	ErrOutOfRange    = errors.New("out of range")
	ErrCorrupt       = errors.New("corrupt store")
	ErrInvalidSize   = errors.New("invalid size")
	ErrClosed        = errors.New("chain is closed")
	ErrNotSupported  = errors.New("not supported")
	ErrBaseChanged   = errors.New("base image changed")
	ErrExtentHint    = errors.New("layer carries an XFS extent size hint")
	ErrHasDependents = errors.New("has dependents")
)
