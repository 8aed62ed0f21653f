//! Content-addressed files verified piece by piece, as the `bao` format of BLAKE3 does.
//!
//! A file is named by its plain BLAKE3 hash. It is cut into groups of [`GROUP_LEN`] bytes
//! (256 BLAKE3 chunks, the last group shorter); the *outboard* is the list of the groups'
//! chaining values (32 bytes each), a subtree level of BLAKE3's own hash tree. A receiver
//! first fetches the outboard and checks that it merges into the file's hash ([`root`]),
//! then checks every group it receives against its chaining value ([`group_ok`]): a bad
//! group is refetched alone, and nothing unverified is ever kept. A file of one group has
//! an empty outboard and is checked whole against its hash.
//!
//! The tree shape is BLAKE3's (`blake3::hazmat::left_subtree_len`, BLAKE3 spec section
//! 2.1): a left subtree holds the largest power of two of chunks smaller than the input,
//! which for inputs longer than one group is a whole number of groups, so the groups are
//! subtrees of the file's tree.

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

/// Bytes per group: 256 BLAKE3 chunks of 1024 bytes.
pub const GROUP_LEN: u64 = 256 * blake3::CHUNK_LEN as u64;

/// Number of groups of a file of `len` bytes (at least one: an empty file is one empty
/// group).
pub fn groups(len: u64) -> u64 {
    len.div_ceil(GROUP_LEN).max(1)
}

/// Byte range `[start, end)` of group `index` of a file of `len` bytes (`None` past the
/// last group).
pub fn group_range(len: u64, index: u64) -> Option<(u64, u64)> {
    (index < groups(len)).then(|| {
        let start = index * GROUP_LEN;
        (start, (start + GROUP_LEN).min(len))
    })
}

/// Length of the outboard of a file of `len` bytes: 32 bytes per group, none for one group.
pub fn outboard_len(len: u64) -> u64 {
    match groups(len) {
        1 => 0,
        n => 32 * n,
    }
}

/// Chaining value of group `index` holding `data` (its bytes, at offset
/// `index * GROUP_LEN` of a file of more than one group).
pub fn group_cv(index: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * GROUP_LEN);
    h.update(data);
    h.finalize_non_root()
}

/// Incremental outboard: feed the file's bytes in order with [`Outboard::update`], then
/// [`Outboard::finish`] gives the hash and the outboard, in one pass and bounded memory.
#[derive(Default)]
pub struct Outboard {
    whole: blake3::Hasher,
    group: Vec<u8>,
    cvs: Vec<u8>,
    len: u64,
}

impl Outboard {
    /// Adds the next bytes of the file.
    pub fn update(&mut self, mut data: &[u8]) {
        self.whole.update(data);
        while !data.is_empty() {
            let room = GROUP_LEN as usize - self.group.len();
            let take = room.min(data.len());
            self.group.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.group.len() == GROUP_LEN as usize && !data.is_empty() {
                self.flush();
            }
        }
    }

    fn flush(&mut self) {
        let index = self.len / GROUP_LEN;
        self.cvs.extend_from_slice(&group_cv(index, &self.group));
        self.len += self.group.len() as u64;
        self.group.clear();
    }

    /// The file's BLAKE3 hash, its length and its outboard.
    pub fn finish(mut self) -> ([u8; 32], u64, Vec<u8>) {
        let len = self.len + self.group.len() as u64;
        if groups(len) > 1 {
            self.flush();
        }
        (*self.whole.finalize().as_bytes(), len, self.cvs)
    }
}

/// The outboard of `data` (see [`Outboard`]).
pub fn outboard(data: &[u8]) -> Vec<u8> {
    let mut o = Outboard::default();
    o.update(data);
    o.finish().2
}

/// Merges an outboard into the root hash of a file of `len` bytes; `None` when the outboard
/// has the wrong length. Compare the result with the file's name.
pub fn root(outboard: &[u8], len: u64) -> Option<[u8; 32]> {
    let n = groups(len);
    if n < 2 || outboard.len() as u64 != 32 * n {
        return None;
    }
    let cvs: Vec<ChainingValue> = outboard
        .chunks_exact(32)
        .map(|c| {
            let mut cv = [0u8; 32];
            cv.copy_from_slice(c);
            cv
        })
        .collect();
    let (l, r) = split(&cvs, len);
    Some(*merge_subtrees_root(&l, &r, Mode::Hash).as_bytes())
}

/// The two children of the root of a subtree of `len` bytes whose groups have `cvs`.
fn split(cvs: &[ChainingValue], len: u64) -> (ChainingValue, ChainingValue) {
    let left = left_subtree_len(len);
    let at = (left / GROUP_LEN) as usize;
    (subtree(&cvs[..at], left), subtree(&cvs[at..], len - left))
}

fn subtree(cvs: &[ChainingValue], len: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (l, r) = split(cvs, len);
    merge_subtrees_non_root(&l, &r, Mode::Hash)
}

/// Whether `data` is group `index` of the file named `hash` of `len` bytes, whose outboard
/// (already checked with [`root`]) is `outboard`. Wrong lengths and indices are `false`.
pub fn group_ok(hash: &[u8; 32], len: u64, outboard: &[u8], index: u64, data: &[u8]) -> bool {
    let Some((start, end)) = group_range(len, index) else {
        return false;
    };
    if data.len() as u64 != end - start {
        return false;
    }
    if groups(len) == 1 {
        return blake3::hash(data).as_bytes() == hash;
    }
    let i = index as usize * 32;
    outboard.get(i..i + 32) == Some(&group_cv(index, data)[..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + i / 977) as u8).collect()
    }

    #[test]
    fn the_outboard_merges_into_the_plain_blake3_hash() {
        let g = GROUP_LEN as usize;
        for len in [
            g + 1,
            2 * g,
            2 * g + 5,
            3 * g,
            5 * g - 1,
            8 * g,
            9 * g + 1024,
        ] {
            let data = bytes(len);
            let ob = outboard(&data);
            assert_eq!(ob.len() as u64, outboard_len(len as u64), "len {len}");
            let want = *blake3::hash(&data).as_bytes();
            assert_eq!(root(&ob, len as u64), Some(want), "len {len}");
            for i in 0..groups(len as u64) {
                let (s, e) = group_range(len as u64, i).unwrap();
                assert!(group_ok(
                    &want,
                    len as u64,
                    &ob,
                    i,
                    &data[s as usize..e as usize]
                ));
            }
        }
    }

    #[test]
    fn incremental_and_one_shot_outboards_agree() {
        let data = bytes(3 * GROUP_LEN as usize + 77);
        let mut o = Outboard::default();
        for piece in data.chunks(10_007) {
            o.update(piece);
        }
        let (hash, len, ob) = o.finish();
        assert_eq!(hash, *blake3::hash(&data).as_bytes());
        assert_eq!(len, data.len() as u64);
        assert_eq!(ob, outboard(&data));
    }

    #[test]
    fn a_small_file_is_checked_whole() {
        for len in [0usize, 1, 1024, GROUP_LEN as usize] {
            let data = bytes(len);
            let h = *blake3::hash(&data).as_bytes();
            assert!(outboard(&data).is_empty());
            assert!(group_ok(&h, len as u64, &[], 0, &data));
            let mut bad = data.clone();
            if let Some(b) = bad.first_mut() {
                *b ^= 1;
                assert!(!group_ok(&h, len as u64, &[], 0, &bad));
            }
        }
    }

    #[test]
    fn a_flipped_byte_fails_only_its_own_group() {
        let len = 4 * GROUP_LEN as usize + 9;
        let mut data = bytes(len);
        let h = *blake3::hash(&data).as_bytes();
        let ob = outboard(&data);
        data[2 * GROUP_LEN as usize + 100] ^= 0x40;
        for i in 0..groups(len as u64) {
            let (s, e) = group_range(len as u64, i).unwrap();
            let ok = group_ok(&h, len as u64, &ob, i, &data[s as usize..e as usize]);
            assert_eq!(ok, i != 2, "group {i}");
        }
        // A group sent as another index, or cut short, fails too.
        let g0 = &data[..GROUP_LEN as usize];
        assert!(!group_ok(&h, len as u64, &ob, 1, g0));
        assert!(!group_ok(&h, len as u64, &ob, 0, &g0[1..]));
        assert!(!group_ok(&h, len as u64, &ob, 99, g0));
    }

    #[test]
    fn a_tampered_outboard_does_not_merge_into_the_hash() {
        let data = bytes(3 * GROUP_LEN as usize);
        let h = *blake3::hash(&data).as_bytes();
        let mut ob = outboard(&data);
        ob[40] ^= 1;
        assert_ne!(root(&ob, data.len() as u64), Some(h));
        assert_eq!(root(&ob[..64], data.len() as u64), None);
    }
}
