//! Binary Merkle trees over per-step state hashes, and dispute bisection.
//!
//! Layout (version 1):
//!
//! * a leaf `x` enters the tree as `H_leaf(x)`, an inner node as `H_node(left ‖ right)`;
//!   the two use different blake3 derive-key contexts, so a leaf can never pass for a node;
//! * a level with an odd number of nodes **promotes** its last node unchanged to the next
//!   level (no duplication, so `[a, b, c]` and `[a, b, c, c]` have different roots);
//! * the root is `H_root(leaf_count as u64 LE ‖ top)`, which binds the number of leaves: a
//!   proof that lies about `leaf_count` (to move a leaf to another index of a differently
//!   shaped tree) does not verify;
//! * the empty tree has the all-zero root (the `step_root` of single-step tasks).

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

fn root_hash(leaf_count: u64, top: &Hash) -> Hash {
    let mut h = blake3::Hasher::new_derive_key("dtrain merkle root v1");
    h.update(&leaf_count.to_le_bytes());
    h.update(top);
    *h.finalize().as_bytes()
}

/// A Merkle tree over leaf hashes, keeping every level so proofs are cheap.
#[derive(Clone, Debug)]
pub struct MerkleTree {
    /// `levels[0]` holds the hashed leaves, the last level the single top node
    /// (or nothing for an empty tree).
    levels: Vec<Vec<Hash>>,
    root: Hash,
}

/// The sibling path of one leaf, checkable against a root with [`MerkleProof::verify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerkleProof {
    /// Index of the leaf.
    pub index: u64,
    /// Number of leaves of the tree (bound into the root).
    pub leaf_count: u64,
    /// Siblings from the bottom up; levels where the node is promoted contribute none.
    pub siblings: Vec<Hash>,
}

impl MerkleTree {
    /// Builds the tree over `leaves` (an empty list gives the all-zero root).
    pub fn new(leaves: Vec<Hash>) -> Self {
        let mut levels = vec![leaves.iter().map(leaf_hash).collect::<Vec<_>>()];
        loop {
            let prev = &levels[levels.len() - 1];
            if prev.len() <= 1 {
                break;
            }
            let next = prev
                .chunks(2)
                .map(|c| match c {
                    [l, r] => node_hash(l, r),
                    [single] => *single,
                    _ => unreachable!("chunks(2) yields one or two items"),
                })
                .collect();
            levels.push(next);
        }
        let n = levels[0].len() as u64;
        let root = match levels[levels.len() - 1].first() {
            Some(top) => root_hash(n, top),
            None => [0; 32],
        };
        MerkleTree { levels, root }
    }

    /// The root (all zero for an empty tree).
    pub fn root(&self) -> Hash {
        self.root
    }

    /// Number of leaves.
    pub fn len(&self) -> usize {
        self.levels[0].len()
    }

    /// Whether there are no leaves.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The proof for leaf `index`, or `None` when out of range.
    pub fn proof(&self, index: usize) -> Option<MerkleProof> {
        if index >= self.len() {
            return None;
        }
        let mut siblings = Vec::new();
        let mut i = index;
        for level in &self.levels[..self.levels.len() - 1] {
            if let Some(sib) = level.get(i ^ 1) {
                siblings.push(*sib);
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
    /// Whether `leaf` is the leaf at `self.index` of a `self.leaf_count`-leaf tree with
    /// root `root`. Safe on untrusted proofs: malformed ones (index out of range, too few
    /// or too many siblings) are rejected, and the work is bounded by 64 levels.
    pub fn verify(&self, root: &Hash, leaf: &Hash) -> bool {
        if self.index >= self.leaf_count {
            return false;
        }
        let mut h = leaf_hash(leaf);
        let (mut i, mut width) = (self.index, self.leaf_count);
        let mut sibs = self.siblings.iter();
        while width > 1 {
            if (i ^ 1) < width {
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
        sibs.next().is_none() && root_hash(self.leaf_count, &h) == *root
    }
}

/// Dispute localisation by bisection.
///
/// `agrees(i)` says whether the other party's state hash at step `i` equals ours (in an
/// interactive dispute the other party sends it with a [`MerkleProof`] against the root it
/// committed to). Assuming agreement is a prefix property (true up to some step, false
/// from then on, as for two traces that start from the same state and differ at the end),
/// this returns the first index in `0..len` where `agrees` is false, or `None` when every
/// index agrees. It makes at most `ceil(log2(len + 1))` ≤ `ceil(log2(len)) + 1` calls.
///
/// Even when `agrees` is not monotone (a lying party), a returned `Some(i)` was observed to
/// disagree at `i` and, if `i > 0`, to agree at `i - 1`: a single step from an agreed state
/// to a disputed one, which is what the referee re-executes.
pub fn first_divergence(len: usize, mut agrees: impl FnMut(usize) -> bool) -> Option<usize> {
    // Invariant: every index < lo agrees (observed at lo - 1), and hi == len or hi disagrees.
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

    fn ceil_log2(n: usize) -> usize {
        if n <= 1 {
            0
        } else {
            (usize::BITS - (n - 1).leading_zeros()) as usize
        }
    }

    #[test]
    fn proofs_verify_for_every_leaf_and_size() {
        for n in 1..=33 {
            let l = leaves(n);
            let t = MerkleTree::new(l.clone());
            assert_eq!(t.len(), n);
            assert!(!t.is_empty());
            for (i, leaf) in l.iter().enumerate() {
                let p = t.proof(i).unwrap();
                assert!(p.verify(&t.root(), leaf), "n={n} i={i}");
                assert!(!p.verify(&t.root(), &[0xaa; 32]), "wrong leaf");
                assert!(!p.verify(&[0; 32], leaf), "wrong root");
                let other_root = MerkleTree::new(leaves(n + 1)).root();
                assert!(!p.verify(&other_root, leaf), "other tree's root");
                for j in (0..n).filter(|&j| j != i) {
                    let moved = MerkleProof {
                        index: j as u64,
                        ..p.clone()
                    };
                    assert!(!moved.verify(&t.root(), leaf), "wrong index n={n} i={i}");
                }
                let mut extra = p.clone();
                extra.siblings.push([0; 32]);
                assert!(!extra.verify(&t.root(), leaf), "extra sibling");
                if !p.siblings.is_empty() {
                    let mut short = p.clone();
                    short.siblings.pop();
                    assert!(!short.verify(&t.root(), leaf), "missing sibling");
                }
            }
            assert!(t.proof(n).is_none());
        }
        let empty = MerkleTree::new(vec![]);
        assert_eq!(empty.root(), [0; 32]);
        assert!(empty.is_empty());
        assert!(empty.proof(0).is_none());
    }

    #[test]
    fn leaf_count_is_bound_into_the_root() {
        // Leaf 2 of [a, b, c] sits under the same top-level path as leaf 1 of a two-leaf
        // tree [node(a, b), c]; without the count in the root this forged proof would pass.
        let l = leaves(3);
        let t = MerkleTree::new(l.clone());
        let honest = t.proof(2).unwrap();
        assert_eq!(honest.siblings.len(), 1);
        let forged = MerkleProof {
            index: 1,
            leaf_count: 2,
            siblings: honest.siblings.clone(),
        };
        assert!(honest.verify(&t.root(), &l[2]));
        assert!(!forged.verify(&t.root(), &l[2]));
        // Promotion, not duplication: a repeated last leaf changes the root.
        let mut dup = l.clone();
        dup.push(l[2]);
        assert_ne!(MerkleTree::new(dup).root(), t.root());
        // Absurd counts are rejected without work.
        let huge = MerkleProof {
            index: u64::MAX,
            leaf_count: u64::MAX,
            siblings: vec![],
        };
        assert!(!huge.verify(&t.root(), &l[0]));
    }

    #[test]
    fn root_is_canonical() {
        assert_eq!(
            hex::encode(MerkleTree::new(leaves(5)).root()),
            "429013266d405a7901a2947a00b05b36344134ddc68cff97ebaafd56c43fe096"
        );
    }

    #[test]
    fn bisection_call_bound_is_tight_at_powers_of_two() {
        for len in [1usize, 2, 3, 4, 7, 8, 9, 1000, 1024, 1025] {
            for cut in [0, 1, len / 2, len.saturating_sub(1), len] {
                let mut calls = 0;
                let got = first_divergence(len, |i| {
                    calls += 1;
                    i < cut
                });
                assert_eq!(got, (cut < len).then_some(cut));
                assert!(calls <= ceil_log2(len) + 1, "len={len} cut={cut}");
            }
        }
        assert_eq!(first_divergence(0, |_| panic!("no calls for len 0")), None);
    }

    /// The interactive protocol: the accused commits to a Merkle root over its per-step
    /// states, the verifier asks for states at bisection points with proofs.
    #[test]
    fn bisection_over_merkle_proved_states() {
        let n = 100;
        let honest: Vec<Hash> = (0..n)
            .map(|i| *blake3::hash(&(i as u64).to_le_bytes()).as_bytes())
            .collect();
        for cheat_at in [1, 2, 37, 98, 99] {
            let mut claimed = honest.clone();
            for h in &mut claimed[cheat_at..] {
                h[0] ^= 0xff;
            }
            let committed = MerkleTree::new(claimed.clone());
            let root = committed.root();
            let mut queried = vec![];
            let got = first_divergence(n, |i| {
                queried.push(i);
                // The accused answers with its state and a proof; the verifier checks both.
                let proof = committed.proof(i).unwrap();
                assert!(proof.verify(&root, &claimed[i]));
                claimed[i] == honest[i]
            });
            assert_eq!(got, Some(cheat_at));
            assert!(queried.len() <= ceil_log2(n) + 1);
        }
    }

    proptest! {
        #[test]
        fn random_trees(n in 1usize..200, pick in 0usize..200, other in 0usize..200, seed in any::<u64>()) {
            let l: Vec<Hash> = (0..n)
                .map(|i| *blake3::hash(&[seed.to_le_bytes(), (i as u64).to_le_bytes()].concat()).as_bytes())
                .collect();
            let t = MerkleTree::new(l.clone());
            let i = pick % n;
            let p = t.proof(i).unwrap();
            prop_assert!(p.verify(&t.root(), &l[i]));
            let j = other % n;
            if j != i {
                prop_assert!(!p.verify(&t.root(), &l[j]), "another leaf");
                let moved = MerkleProof { index: j as u64, ..p.clone() };
                prop_assert!(!moved.verify(&t.root(), &l[i]), "another index");
            }
            let mut bad_root = t.root();
            bad_root[pick % 32] ^= 1;
            prop_assert!(!p.verify(&bad_root, &l[i]));
        }

        #[test]
        fn bisection_matches_linear_scan(len in 0usize..5000, cut in 0usize..6000) {
            let mut calls = 0;
            let got = first_divergence(len, |i| { calls += 1; i < cut });
            let want = (0..len).find(|&i| i >= cut);
            prop_assert_eq!(got, want);
            prop_assert!(calls <= ceil_log2(len) + 1, "calls {} > {}", calls, ceil_log2(len) + 1);
        }

        #[test]
        fn bisection_result_is_locally_justified(len in 1usize..500, answers in proptest::collection::vec(any::<bool>(), 500)) {
            // Arbitrary (non-monotone) answers: a Some(i) is still an observed agree -> disagree step.
            let mut seen = std::collections::HashMap::new();
            let got = first_divergence(len, |i| { seen.insert(i, answers[i]); answers[i] });
            if let Some(i) = got {
                prop_assert_eq!(seen.get(&i), Some(&false));
                if i > 0 {
                    prop_assert_eq!(seen.get(&(i - 1)), Some(&true));
                }
            }
        }
    }
}
