//! Binary Merkle trees over per-step state hashes, and dispute bisection.
//!
//! Leaves and inner nodes are hashed under different domain tags; a level with an odd
//! number of nodes promotes its last node unchanged to the next level.

use serde::{Deserialize, Serialize};

use crate::Hash;

fn leaf_hash(leaf: &Hash) -> Hash {
    let mut h = blake3::Hasher::new_derive_key("dtrain merkle leaf v1");
    h.update(leaf);
    *h.finalize().as_bytes()
}

fn node_hash(l: &Hash, r: &Hash) -> Hash {
    let mut h = blake3::Hasher::new_derive_key("dtrain merkle node v1");
    h.update(l);
    h.update(r);
    *h.finalize().as_bytes()
}

/// A Merkle tree with all its levels.
#[derive(Clone, Debug)]
pub struct MerkleTree {
    levels: Vec<Vec<Hash>>,
}

/// The sibling path of one leaf.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerkleProof {
    /// Index of the leaf.
    pub index: u64,
    /// Number of leaves of the tree.
    pub leaf_count: u64,
    /// Siblings from the bottom up (promoted levels have none).
    pub siblings: Vec<Hash>,
}

impl MerkleTree {
    /// Builds the tree over `leaves`.
    pub fn new(leaves: Vec<Hash>) -> Self {
        let mut levels = vec![leaves.iter().map(leaf_hash).collect::<Vec<_>>()];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let prev = levels.last().expect("non-empty");
            let next = prev
                .chunks(2)
                .map(|c| {
                    if c.len() == 2 {
                        node_hash(&c[0], &c[1])
                    } else {
                        c[0]
                    }
                })
                .collect();
            levels.push(next);
        }
        MerkleTree { levels }
    }

    /// The root (all zero for an empty tree).
    pub fn root(&self) -> Hash {
        self.levels
            .last()
            .and_then(|l| l.first().copied())
            .unwrap_or([0; 32])
    }

    /// Number of leaves.
    pub fn len(&self) -> usize {
        self.levels[0].len()
    }

    /// Whether there are no leaves.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The proof for leaf `index`.
    pub fn proof(&self, index: usize) -> Option<MerkleProof> {
        if index >= self.len() {
            return None;
        }
        let mut siblings = Vec::new();
        let mut i = index;
        for level in &self.levels[..self.levels.len() - 1] {
            let sib = i ^ 1;
            if sib < level.len() {
                siblings.push(level[sib]);
            }
            i /= 2;
        }
        Some(MerkleProof {
            index: index as u64,
            leaf_count: self.len() as u64,
            siblings,
        })
    }
}

impl MerkleProof {
    /// Whether `leaf` sits at `self.index` under `root`.
    pub fn verify(&self, root: &Hash, leaf: &Hash) -> bool {
        if self.index >= self.leaf_count {
            return false;
        }
        let mut h = leaf_hash(leaf);
        let (mut i, mut width) = (self.index, self.leaf_count);
        let mut sibs = self.siblings.iter();
        while width > 1 {
            let sib = i ^ 1;
            if sib < width {
                let Some(s) = sibs.next() else {
                    return false;
                };
                h = if i % 2 == 0 {
                    node_hash(&h, s)
                } else {
                    node_hash(s, &h)
                };
            }
            i /= 2;
            width = width.div_ceil(2);
        }
        sibs.next().is_none() && &h == root
    }
}

/// First index in `0..len` where `agrees(i)` is false, assuming agreement is a prefix
/// property (true up to some point, false after), found by binary search in
/// O(log len) calls. `None` when every index agrees.
pub fn first_divergence(len: usize, mut agrees: impl FnMut(usize) -> bool) -> Option<usize> {
    let (mut lo, mut hi) = (0usize, len);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if agrees(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    (lo < len).then_some(lo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
            .collect()
    }

    #[test]
    fn proofs_verify_for_every_leaf_and_size() {
        for n in 1..=33 {
            let l = leaves(n);
            let t = MerkleTree::new(l.clone());
            for (i, leaf) in l.iter().enumerate() {
                let p = t.proof(i).unwrap();
                assert!(p.verify(&t.root(), leaf), "n={n} i={i}");
                assert!(!p.verify(&t.root(), &[0xaa; 32]), "wrong leaf");
                assert!(!p.verify(&[0; 32], leaf), "wrong root");
                if n > 1 {
                    let moved = MerkleProof {
                        index: ((i + 1) % n) as u64,
                        ..p.clone()
                    };
                    assert!(!moved.verify(&t.root(), leaf), "wrong index n={n} i={i}");
                }
            }
            assert!(t.proof(n).is_none());
        }
        assert_eq!(MerkleTree::new(vec![]).root(), [0; 32]);
    }

    proptest! {
        #[test]
        fn random_trees(n in 1usize..200, pick in 0usize..200, seed in any::<u64>()) {
            let l: Vec<Hash> = (0..n).map(|i| *blake3::hash(&[seed.to_le_bytes(), (i as u64).to_le_bytes()].concat()).as_bytes()).collect();
            let t = MerkleTree::new(l.clone());
            let i = pick % n;
            prop_assert!(t.proof(i).unwrap().verify(&t.root(), &l[i]));
        }

        #[test]
        fn bisection_matches_linear_scan(len in 0usize..5000, cut in 0usize..6000) {
            let mut calls = 0;
            let got = first_divergence(len, |i| { calls += 1; i < cut });
            let want = (0..len).find(|&i| i >= cut);
            prop_assert_eq!(got, want);
            let bound = (usize::BITS - len.leading_zeros()) as usize + 1;
            prop_assert!(calls <= bound, "calls {} > {}", calls, bound);
        }
    }
}
