package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"sort"
	"strconv"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// Volume and snapshot IDs are derived from the CO's names: the same name always gives the
// same ID, which makes creation idempotent by name without a second index, and an ID is
// always a safe engine name (a prefix and 32 hex digits), never a path a request chose.
const (
	volumePrefix   = "vol-"
	snapshotPrefix = "snap-"
	idHexLen       = 32
)

func deriveID(prefix, name string) string {
	sum := sha256.Sum256([]byte(prefix + "\x00" + name))
	return prefix + hex.EncodeToString(sum[:idHexLen/2])
}

func volumeIDFor(name string) string   { return deriveID(volumePrefix, name) }
func snapshotIDFor(name string) string { return deriveID(snapshotPrefix, name) }

// wellFormed reports whether id has the shape deriveID gives with prefix.
func wellFormed(id, prefix string) bool {
	hexPart, ok := strings.CutPrefix(id, prefix)
	if !ok || len(hexPart) != idHexLen {
		return false
	}
	for i := 0; i < len(hexPart); i++ {
		if c := hexPart[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// checkVolumeID fails with InvalidArgument for an empty ID and NotFound for one this driver
// cannot have made: no volume can have it, and it never reaches the file system.
func checkVolumeID(id string) error { return checkID(id, volumePrefix, "volume") }

func checkSnapshotID(id string) error { return checkID(id, snapshotPrefix, "snapshot") }

func checkID(id, prefix, what string) error {
	if id == "" {
		return status.Errorf(codes.InvalidArgument, "%s ID is required", what)
	}
	if !wellFormed(id, prefix) {
		return status.Errorf(codes.NotFound, "%s %q does not exist (not an ID of this driver)", what, truncate(id))
	}
	return nil
}

// required fails with InvalidArgument naming the first empty field; fields come in
// (description, value) pairs.
func required(fields ...string) error {
	for i := 0; i+1 < len(fields); i += 2 {
		if fields[i+1] == "" {
			return status.Errorf(codes.InvalidArgument, "%s is required", fields[i])
		}
	}
	return nil
}

// maxNameLen is the CSI limit on a string field (the spec's "Size Limits"). Names are only
// hashed into IDs, but they are kept as labels in the manifest.
const maxNameLen = 128

func checkNameLen(name string) error {
	if len(name) > maxNameLen {
		return status.Errorf(codes.InvalidArgument, "name %q is longer than %d bytes", truncate(name), maxNameLen)
	}
	return nil
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// Parameters a StorageClass may set. Keys under csi.storage.k8s.io/ belong to the sidecars
// (they pass PVC and PV names there) and are ignored.
const (
	paramBaseImage    = "baseImage"
	paramPresentation = "presentation"
)

var knownParams = []string{paramBaseImage, paramPresentation}

type volumeParams struct {
	BaseImage string
	// Presentation forces how the node attaches the volume: merged (FUSE, any file
	// system) or composed (a plain loop on the composed top: xfs, btrfs). Default auto.
	Presentation string
}

func parseParams(p map[string]string) (volumeParams, error) {
	var vp volumeParams
	for k, v := range p {
		switch {
		case k == paramBaseImage:
			if v != "" && cow.ValidateName(v) != nil {
				return vp, status.Errorf(codes.InvalidArgument, "parameter %s: %q is not an image name (letters, digits, '.', '_', '-')", paramBaseImage, truncate(v))
			}
			vp.BaseImage = v
		case k == paramPresentation:
			switch v {
			case blockdev.PresentAuto, blockdev.PresentMerged, blockdev.PresentComposed:
				vp.Presentation = v
			default:
				return vp, status.Errorf(codes.InvalidArgument, "parameter %s: %q is not auto, merged or composed", paramPresentation, truncate(v))
			}
		case strings.HasPrefix(k, "csi.storage.k8s.io/"):
		default:
			return vp, status.Errorf(codes.InvalidArgument, "unknown parameter %q (known: %s)", truncate(k), strings.Join(knownParams, ", "))
		}
	}
	return vp, nil
}

// parseMutable reads the parameters a VolumeAttributesClass may set and change later:
// only the presentation, which takes effect at the volume's next NodeStageVolume.
func parseMutable(p map[string]string) (presentation string, err error) {
	for k, v := range p {
		if k != paramPresentation {
			return "", status.Errorf(codes.InvalidArgument, "parameter %q cannot be set or changed by a volume attributes class (only %s)", truncate(k), paramPresentation)
		}
		switch v {
		case blockdev.PresentAuto, blockdev.PresentMerged, blockdev.PresentComposed:
			presentation = v
		default:
			return "", status.Errorf(codes.InvalidArgument, "parameter %s: %q is not auto, merged or composed", paramPresentation, truncate(v))
		}
	}
	return presentation, nil
}

// canonical renders the parameters that shape a volume, to compare a retried request with
// the volume it made.
func (vp volumeParams) canonical() string {
	parts := []string{paramBaseImage + "=" + vp.BaseImage, paramPresentation + "=" + vp.Presentation}
	sort.Strings(parts)
	return strings.Join(parts, ";")
}

// Labels the driver keeps on engine volumes and snapshots.
const (
	labelName     = "csi.name"
	labelParams   = "csi.params"
	labelSource   = "csi.source"
	labelRequired = "csi.requiredBytes"
	labelPresent  = "csi.presentation"
)

func sourceLabel(kind, id string) string {
	if id == "" {
		return ""
	}
	return kind + ":" + id
}

func formatInt(n int64) string { return strconv.FormatInt(n, 10) }
