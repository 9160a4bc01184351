//! The tree agrees with the published RFC 6962 test vectors (Certificate
//! Transparency's reference data), and proofs hold for every shape of tree.

use commons_ledger::merkle::*;

const ENTRIES: [&[u8]; 8] = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
];

const ROOTS: [&str; 9] = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

/// (leaf, 1-based as published; tree size; audit path)
const INCLUSION: [(usize, usize, &[&str]); 4] = [
    (
        1,
        8,
        &[
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        &[
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        3,
        3,
        &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    ),
    (
        2,
        5,
        &[
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
];

const CONSISTENCY: [(usize, usize, &[&str]); 4] = [
    (1, 1, &[]),
    (
        1,
        8,
        &[
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        &[
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        &[
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
];

fn leaves() -> Vec<Hash> {
    ENTRIES.iter().map(|e| leaf_hash(e)).collect()
}

fn h(s: &str) -> Hash {
    from_hex(s).unwrap()
}

#[test]
fn roots_match_the_published_vectors() {
    let l = leaves();
    let mut tree = Tree::new();
    assert_eq!(hex(&tree.root()), ROOTS[0]);
    for n in 1..=8 {
        tree.push(l[n - 1]);
        assert_eq!(hex(&root(&l[..n])), ROOTS[n], "MTH of {n}");
        assert_eq!(hex(&tree.root()), ROOTS[n], "incremental root of {n}");
    }
}

#[test]
fn inclusion_proofs_match_the_published_vectors() {
    let l = leaves();
    for (leaf, size, path) in INCLUSION {
        let proof = inclusion_proof(leaf - 1, &l[..size]);
        let got: Vec<String> = proof.iter().map(hex).collect();
        assert_eq!(got, path, "leaf {leaf} of {size}");
        assert!(verify_inclusion(
            (leaf - 1) as u64,
            size as u64,
            &l[leaf - 1],
            &proof,
            &h(ROOTS[size])
        ));
        assert!(!verify_inclusion(
            (leaf - 1) as u64,
            size as u64,
            &l[leaf - 1],
            &proof,
            &h(ROOTS[size - 1])
        ));
    }
}

#[test]
fn consistency_proofs_match_the_published_vectors() {
    let l = leaves();
    for (first, second, path) in CONSISTENCY {
        let proof = consistency_proof(first, &l[..second]);
        let got: Vec<String> = proof.iter().map(hex).collect();
        assert_eq!(got, path, "{first} -> {second}");
        assert!(verify_consistency(
            first as u64,
            second as u64,
            &proof,
            &h(ROOTS[first]),
            &h(ROOTS[second])
        ));
    }
}

#[test]
fn every_proof_in_every_small_tree_verifies_and_tampering_fails() {
    let l: Vec<Hash> = (0u32..40).map(|i| leaf_hash(&i.to_be_bytes())).collect();
    for n in 1..=l.len() {
        let r = root(&l[..n]);
        for i in 0..n {
            let p = inclusion_proof(i, &l[..n]);
            assert!(
                verify_inclusion(i as u64, n as u64, &l[i], &p, &r),
                "leaf {i} of {n}"
            );
            let mut bad = l[i];
            bad[0] ^= 1;
            assert!(!verify_inclusion(i as u64, n as u64, &bad, &p, &r));
            if n > 1 {
                assert!(
                    !verify_inclusion(((i + 1) % n) as u64, n as u64, &l[i], &p, &r)
                        || l[i] == l[(i + 1) % n]
                );
            }
        }
        for m in 1..=n {
            let p = consistency_proof(m, &l[..n]);
            let rm = root(&l[..m]);
            assert!(
                verify_consistency(m as u64, n as u64, &p, &rm, &r),
                "{m} -> {n}"
            );
            let mut bad = rm;
            bad[31] ^= 1;
            assert!(!verify_consistency(m as u64, n as u64, &p, &bad, &r));
        }
    }
}
