package cow

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
)

// maxNameLen bounds volume and snapshot names; CSI names are at most 128 bytes.
const maxNameLen = 128

// ValidateName checks a volume or snapshot name. Names become file names (lock files), so
// only [A-Za-z0-9._-] is allowed, and never a leading dot: no "..", no "/", nothing hidden.
func ValidateName(name string) error {
	if name == "" {
		return fmt.Errorf("%w: empty name", ErrInvalidName)
	}
	if len(name) > maxNameLen {
		return fmt.Errorf("%w: %q is longer than %d bytes", ErrInvalidName, name[:16]+"...", maxNameLen)
	}
	if name[0] == '.' {
		return fmt.Errorf("%w: %q starts with a dot", ErrInvalidName, name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
		default:
			return fmt.Errorf("%w: %q contains %q (allowed: letters, digits, '.', '_', '-')", ErrInvalidName, name, c)
		}
	}
	return nil
}

// layerIDLen is the length of a layer id: 16 random bytes in hex.
const layerIDLen = 32

func newLayerID() string {
	var b [layerIDLen / 2]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("crypto/rand: %v", err)) // never fails on Linux
	}
	return hex.EncodeToString(b[:])
}

// validLayerID reports whether id has the shape newLayerID makes. Ids come from the
// manifest, which could be damaged or hand-edited: check before making a path of one.
func validLayerID(id string) bool {
	if len(id) != layerIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}
