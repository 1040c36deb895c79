//! Hostile input against every RPC of every service (the real binaries): bytes that are not
//! protobuf, a message over the size limit, unknown enum values, and empty requests. Each call
//! gets a clean gRPC error (never a crash, a hang or an internal error other than the codec's own
//! "cannot decode"), and every service keeps serving afterwards.
use anyhow::Context;
use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorSet, field_descriptor_proto::Type};
use tonic::Code;
use yidi_proto::v1 as pb;
use yidi_tests::{Db, NATIONAL_DAY, card_check, on_both_databases, raw::call, serial, start, topology::Process};

on_both_databases!(every_rpc_answers_hostile_input_with_a_clean_error_and_keeps_serving);

async fn every_rpc_answers_hostile_input_with_a_clean_error_and_keeps_serving(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let descriptors = FileDescriptorSet::decode(yidi_proto::FILE_DESCRIPTOR_SET)?;
    let services = [
        (Process::Intake, "Intake"),
        (Process::HomeJiangxi, "Verification"),
        (Process::Issuance, "Issuance"),
        (Process::Registry, "LossRegistry"),
    ];
    let mut calls = 0;
    for (process, service_name) in services {
        let channel = t.channel(process).await?;
        let service = descriptors
            .file
            .iter()
            .flat_map(|file| &file.service)
            .find(|service| service.name() == service_name)
            .with_context(|| format!("{service_name} in the descriptor set"))?;
        for method in &service.method {
            let path = format!("/yidi.v1.{service_name}/{}", method.name());
            let input = message_type(&descriptors, method.input_type())?;
            let bodies = [
                ("not protobuf", vec![0xff; 16]),
                ("over the size limit", vec![0x0a; 5 * 1024 * 1024]),
                ("unknown enum values", with_unknown_enums(&descriptors, input, 3)?),
                ("empty", Vec::new()),
            ];
            for (what, body) in bodies {
                let streaming = method.server_streaming();
                let status = call(&channel, &path, body, streaming).await;
                let clean = match status.code() {
                    Code::Ok
                    | Code::InvalidArgument
                    | Code::NotFound
                    | Code::FailedPrecondition
                    | Code::PermissionDenied
                    | Code::AlreadyExists
                    | Code::OutOfRange
                    | Code::ResourceExhausted => true,
                    // The codec's own answer to bytes that are not the message.
                    Code::Internal => what == "not protobuf" && status.message().contains("decode"),
                    // (the size limit's own answer is checked below)
                    // A well-formed request to a stream that stays open until the client leaves.
                    Code::DeadlineExceeded | Code::Cancelled => streaming && what != "not protobuf",
                    _ => false,
                };
                assert!(clean, "{path} given {what}: {:?} {:?}", status.code(), status.message());
                if what == "over the size limit" {
                    assert!(
                        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
                        "{path}: an oversized message is refused as such: {status:?}"
                    );
                }
                if what == "not protobuf" {
                    assert_ne!(status.code(), Code::Ok, "{path}: garbage is never accepted");
                }
                calls += 1;
            }
        }
    }
    assert!(calls >= 4 * 20, "every method of every service was tried ({calls} calls)");

    for process in Process::ALL {
        let channel = t.channel(process).await?;
        assert!(yidi_grpc::client::is_serving(&channel).await, "{process:?} still serves");
    }
    let citizen = t.citizen("replacement", "36")?;
    let check = card_check(&citizen, serial(&citizen), "test-bank");
    let answer = t.registry().await?.check_card(check).await?.into_inner();
    assert_eq!(answer.status, pb::CardStatus::Valid as i32, "the registry still answers real questions");
    t.stop().await
}

fn message_type<'a>(descriptors: &'a FileDescriptorSet, full_name: &str) -> anyhow::Result<&'a DescriptorProto> {
    let name = full_name.trim_start_matches(".yidi.v1.");
    let mut found = None;
    for file in &descriptors.file {
        for message in &file.message_type {
            if message.name() == name {
                found = Some(message);
            } else if let Some((outer, inner)) = name.split_once('.')
                && message.name() == outer
            {
                found = message.nested_type.iter().find(|nested| nested.name() == inner).or(found);
            }
        }
    }
    found.with_context(|| format!("message {full_name}"))
}

/// The message with every enum field set to a value no enum defines, and its message fields
/// filled the same way (to `depth`).
fn with_unknown_enums(
    descriptors: &FileDescriptorSet,
    message: &DescriptorProto,
    depth: u8,
) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    for field in &message.field {
        let number = u64::try_from(field.number())?;
        match field.r#type() {
            Type::Enum => {
                prost::encoding::encode_varint(number << 3, &mut bytes);
                prost::encoding::encode_varint(12_345, &mut bytes);
            }
            Type::Message if depth > 0 && !field.type_name().starts_with(".google.") => {
                let nested = with_unknown_enums(descriptors, message_type(descriptors, field.type_name())?, depth - 1)?;
                prost::encoding::encode_varint((number << 3) | 2, &mut bytes);
                prost::encoding::encode_varint(nested.len() as u64, &mut bytes);
                bytes.extend_from_slice(&nested);
            }
            _ => {}
        }
    }
    Ok(bytes)
}
