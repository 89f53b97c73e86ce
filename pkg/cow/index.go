package cow

// owner says what serves a range of the merged view: layer<<1 | zero, or none.
// A zero owner is a zero-list entry of that layer: the range reads zero and hides
// everything below. Packed into 32 bits so that an index span stays 24 bytes.
type owner int32

const none owner = -1

func dataOwner(layer int) owner { return owner(layer << 1) }
func zeroOwner(layer int) owner { return owner(layer<<1 | 1) }

// layer is the index of the layer that owns the range, or -1 for none.
func (o owner) layer() int { return int(o >> 1) }

// hasData reports whether the range is served from a layer file.
func (o owner) hasData() bool { return o >= 0 && o&1 == 0 }

// state is the value of the merged index. cur is what reads see. below is what the layers
// under the top hold there; it is kept only while cur belongs to the top (writes and
// discards of the top need it), elsewhere it equals cur. After a snapshot the old top's
// spans simply stop being the top's: no pass over the index is needed.
type state struct {
	cur, below owner
}

// lowerOf returns what the layers under layer top hold in a range whose state is st.
func lowerOf(st state, ok bool, top int) owner {
	if !ok {
		return none
	}
	if st.cur.layer() == top {
		return st.below
	}
	return st.cur
}

// index is the merged view of a chain: for every range, the layer that serves it.
type index = rangeMap[state]

// applyLayer lays the presence of layer i over the index: its zero list first, then its
// data (data written in a layer wins over that layer's own zero-list entry). top is the
// index of the chain's writable top, or -1 when there is none.
func applyLayer(idx *index, i, top int, zeros, data []Extent) {
	if idx.len() == 0 {
		// Nothing below: zero-list entries hide nothing, and the data goes in as it comes.
		for _, e := range data {
			o := dataOwner(i)
			idx.tree.ReplaceOrInsert(span[state]{start: e.Off, end: e.End(), val: state{cur: o, below: below(o, none, i == top)}})
		}
		return
	}
	for _, e := range zeros {
		idx.update(e.Off, e.End(), func(st state, ok bool) (state, bool) {
			low := lowerOf(st, ok, i)
			if !low.hasData() {
				return st, ok
			}
			return state{cur: zeroOwner(i), below: below(zeroOwner(i), low, i == top)}, true
		})
	}
	for _, e := range data {
		idx.update(e.Off, e.End(), func(st state, ok bool) (state, bool) {
			low := lowerOf(st, ok, i)
			return state{cur: dataOwner(i), below: below(dataOwner(i), low, i == top)}, true
		})
	}
}

// below picks the below field for a span now owned by cur: the real lower owner for the
// top, cur itself elsewhere (so equal neighbours coalesce).
func below(cur, low owner, isTop bool) owner {
	if isTop {
		return low
	}
	return cur
}
