//! The AT Protocol interop vectors (`tests/vectors`, CC0, see its SOURCE):
//! every valid example must pass and every invalid one must be refused.

use std::path::PathBuf;

use commons_data::keys::{Keypair, PublicKey};
use commons_data::model::{self, Ipld};
use commons_data::mst::{self, NodeStore, Tree};
use commons_data::syntax;
use serde_json::Value;

fn vector_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(name)
}

fn json(name: &str) -> Value {
    let path = vector_path(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read vector file {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The non-comment, non-blank lines of a syntax vector file.
fn lines(name: &str) -> Vec<String> {
    let path = vector_path(&format!("syntax/{name}"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read vector file {}: {e}", path.display()));
    let out: Vec<String> = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    assert!(!out.is_empty(), "{name} holds no vectors");
    out
}

fn check_syntax(name: &str, check: fn(&str) -> Result<(), syntax::SyntaxError>) {
    let mut wrong = Vec::new();
    for valid in lines(&format!("{name}_syntax_valid.txt")) {
        if let Err(e) = check(&valid) {
            wrong.push(format!("refused valid {valid:?}: {e}"));
        }
    }
    for invalid in lines(&format!("{name}_syntax_invalid.txt")) {
        if check(&invalid).is_ok() {
            wrong.push(format!("accepted invalid {invalid:?}"));
        }
    }
    assert!(wrong.is_empty(), "{name}:\n{}", wrong.join("\n"));
}

#[test]
fn syntax_vectors() {
    check_syntax("did", syntax::did);
    check_syntax("handle", syntax::handle);
    check_syntax("atidentifier", syntax::at_identifier);
    check_syntax("nsid", syntax::nsid);
    check_syntax("recordkey", syntax::record_key);
    check_syntax("tid", syntax::tid);
    check_syntax("aturi", syntax::at_uri);
    check_syntax("datetime", syntax::datetime);
    check_syntax("language", syntax::language);
    check_syntax("uri", syntax::uri);
    check_syntax("cid", syntax::cid_syntax);
    for invalid in lines("datetime_parse_invalid.txt") {
        assert!(syntax::datetime(&invalid).is_err(), "accepted {invalid:?}");
    }
    for invalid in lines("language_parse_invalid.txt") {
        assert!(syntax::language(&invalid).is_err(), "accepted {invalid:?}");
    }
}

#[test]
fn data_model_fixtures_round_trip_json_cbor_and_cid() {
    let fixtures = json("data-model/data-model-fixtures.json");
    let fixtures = fixtures.as_array().unwrap();
    assert!(fixtures.len() >= 3);
    for fixture in fixtures {
        let value = model::from_json(&fixture["json"]).unwrap();
        let (cid, bytes) = model::block(&value);
        let expected = base64_decode(fixture["cbor_base64"].as_str().unwrap());
        assert_eq!(bytes, expected, "DAG-CBOR of {}", fixture["json"]);
        assert_eq!(cid.to_string(), fixture["cid"].as_str().unwrap());
        let decoded = model::decode(&expected).unwrap();
        assert_eq!(decoded, value);
        assert_eq!(model::to_json(&decoded), fixture["json"]);
    }
}

#[test]
fn data_model_valid_and_invalid() {
    for case in json("data-model/data-model-valid.json").as_array().unwrap() {
        model::from_json(&case["json"])
            .unwrap_or_else(|e| panic!("{}: refused: {e}", case["note"]));
    }
    let invalid = json("data-model/data-model-invalid.json");
    assert!(invalid.as_array().unwrap().len() >= 10);
    for case in invalid.as_array().unwrap() {
        assert!(
            model::from_json(&case["json"]).is_err(),
            "{}: accepted",
            case["note"]
        );
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(s).unwrap()
}

#[test]
fn crypto_signature_fixtures() {
    let fixtures = json("crypto/signature-fixtures.json");
    for case in fixtures.as_array().unwrap() {
        let key = PublicKey::from_did_key(case["publicKeyDid"].as_str().unwrap()).unwrap();
        assert_eq!(
            key.algorithm().jwt_name(),
            case["algorithm"].as_str().unwrap()
        );
        let message = base64_decode(case["messageBase64"].as_str().unwrap());
        let signature = base64_decode(case["signatureBase64"].as_str().unwrap());
        let valid = key.verify(&message, &signature).is_ok();
        assert_eq!(
            valid,
            case["validSignature"].as_bool().unwrap(),
            "{}",
            case["comment"]
        );
    }
}

#[test]
fn crypto_did_key_fixtures() {
    for case in json("crypto/w3c_didkey_K256.json").as_array().unwrap() {
        let secret = hex(case["privateKeyBytesHex"].as_str().unwrap());
        let key = Keypair::from_bytes(commons_data::keys::Algorithm::K256, &secret).unwrap();
        assert_eq!(
            key.public().did_key(),
            case["publicDidKey"].as_str().unwrap()
        );
    }
    for case in json("crypto/w3c_didkey_P256.json").as_array().unwrap() {
        let encoded = format!("z{}", case["privateKeyBytesBase58"].as_str().unwrap());
        let (_, secret) = multibase::decode(encoded).unwrap();
        let key = Keypair::from_bytes(commons_data::keys::Algorithm::P256, &secret).unwrap();
        assert_eq!(
            key.public().did_key(),
            case["publicDidKey"].as_str().unwrap()
        );
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn mst_key_heights_and_common_prefixes() {
    for case in json("mst/key_heights.json").as_array().unwrap() {
        let key = case["key"].as_str().unwrap();
        assert_eq!(
            u64::from(mst::key_height(key.as_bytes())),
            case["height"].as_u64().unwrap(),
            "height of {key:?}"
        );
    }
    for case in json("mst/common_prefix.json").as_array().unwrap() {
        let (l, r) = (
            case["left"].as_str().unwrap(),
            case["right"].as_str().unwrap(),
        );
        assert_eq!(
            mst::common_prefix_len(l.as_bytes(), r.as_bytes()) as u64,
            case["len"].as_u64().unwrap(),
            "{l:?} / {r:?}"
        );
    }
}

#[test]
fn firehose_commit_proofs() {
    for case in json("firehose/commit-proof-fixtures.json")
        .as_array()
        .unwrap()
    {
        let name = case["comment"].as_str().unwrap();
        let leaf = model::parse_cid(case["leafValue"].as_str().unwrap()).unwrap();
        let strings = |field: &str| -> Vec<String> {
            case[field]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        };
        let mut store = NodeStore::new();
        let mut tree = Tree::empty(&mut store);
        for key in strings("keys") {
            tree = tree.put(&mut store, &key, leaf).unwrap().0;
        }
        assert_eq!(
            tree.root.to_string(),
            case["rootBeforeCommit"].as_str().unwrap(),
            "{name}: root before"
        );
        let before = tree;
        for key in strings("adds") {
            tree = tree.put(&mut store, &key, leaf).unwrap().0;
        }
        for key in strings("dels") {
            let (next, removed) = tree.delete(&mut store, &key).unwrap();
            assert_eq!(removed, Some(leaf), "{name}: {key} was there");
            tree = next;
        }
        assert_eq!(
            tree.root.to_string(),
            case["rootAfterCommit"].as_str().unwrap(),
            "{name}: root after"
        );
        // The proof a firehose event carries lets a reader invert the ops.
        let mut proof: Vec<String> = Vec::new();
        for key in strings("adds").iter().chain(strings("dels").iter()) {
            for cid in tree.proof(&store, key).unwrap() {
                proof.push(cid.to_string());
            }
        }
        proof.sort();
        proof.dedup();
        let mut expected = strings("blocksInProof");
        expected.sort();
        assert_eq!(proof, expected, "{name}: blocks in proof");
        // Inverting: re-deleting the adds and re-adding the dels on the
        // proof's nodes alone gives the root before.
        let mut inverted = tree;
        for key in strings("adds") {
            inverted = inverted.delete(&mut store, &key).unwrap().0;
        }
        for key in strings("dels") {
            inverted = inverted.put(&mut store, &key, leaf).unwrap().0;
        }
        assert_eq!(inverted.root, before.root, "{name}: inversion");
    }
}

#[test]
fn mst_shape_is_independent_of_write_order() {
    let text = std::fs::read_to_string(vector_path("mst/example_keys.txt")).unwrap();
    let keys: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let leaf = model::cid_of(model::DAG_CBOR, b"leaf");
    let mut store = NodeStore::new();
    let mut forward = Tree::empty(&mut store);
    for key in &keys {
        forward = forward.put(&mut store, key, leaf).unwrap().0;
    }
    let mut backward = Tree::empty(&mut store);
    for key in keys.iter().rev() {
        backward = backward.put(&mut store, key, leaf).unwrap().0;
    }
    assert_eq!(forward.root, backward.root);
    let mut sorted: Vec<(String, _)> = keys.iter().map(|k| (k.to_string(), leaf)).collect();
    sorted.sort();
    assert_eq!(
        Tree::build(&mut store, &sorted).unwrap().root,
        forward.root,
        "bulk build = inserts"
    );
    assert_eq!(forward.entries(&store).unwrap().len(), keys.len());
    // Deleting everything gives back the empty tree.
    let mut tree = forward;
    for key in &keys {
        tree = tree.delete(&mut store, key).unwrap().0;
    }
    assert_eq!(tree.root, Tree::empty(&mut store).root);
    // Diffs name exactly the changed keys.
    let (half, _) = keys.split_at(keys.len() / 2);
    let mut partial = Tree::empty(&mut store);
    for key in half {
        partial = partial.put(&mut store, key, leaf).unwrap().0;
    }
    let diff = mst::diff(&store, Some(partial), Some(forward)).unwrap();
    assert_eq!(diff.record_ops.len(), keys.len() - half.len());
    assert!(diff
        .record_ops
        .iter()
        .all(|(_, old, new)| old.is_none() && *new == Some(leaf)));
    let _ = Ipld::Null;
}

fn catalog() -> commons_data::lexicon::Catalog {
    let mut catalog = commons_data::lexicon::Catalog::new();
    let dir = vector_path("lexicon/catalog");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    assert!(names.len() >= 5);
    for path in names {
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        catalog
            .add(doc)
            .unwrap_or_else(|e| panic!("{} refused: {e}", path.display()));
    }
    catalog
}

#[test]
fn lexicon_documents() {
    use commons_data::lexicon::check_document;
    for case in json("lexicon/lexicon-valid.json").as_array().unwrap() {
        check_document(&case["lexicon"])
            .unwrap_or_else(|e| panic!("{}: refused: {e}", case["name"]));
    }
    for case in json("lexicon/lexicon-invalid.json").as_array().unwrap() {
        assert!(
            check_document(&case["lexicon"]).is_err(),
            "{}: accepted",
            case["name"]
        );
    }
}

#[test]
fn lexicon_record_data() {
    let catalog = catalog();
    let validate = |case: &Value| -> Result<(), String> {
        let data = model::from_json(&case["data"]).map_err(|e| e.to_string())?;
        let nsid = case["data"]["$type"]
            .as_str()
            .unwrap_or("example.lexicon.record");
        catalog
            .validate_record(nsid, case["rkey"].as_str().unwrap(), &data)
            .map_err(|e| e.to_string())
    };
    for case in json("lexicon/record-data-valid.json").as_array().unwrap() {
        validate(case).unwrap_or_else(|e| panic!("{}: refused: {e}", case["name"]));
    }
    let invalid = json("lexicon/record-data-invalid.json");
    assert!(invalid.as_array().unwrap().len() >= 40);
    for case in invalid.as_array().unwrap() {
        assert!(validate(case).is_err(), "{}: accepted", case["name"]);
    }
}
