// The wire format of the step channel (dist/step_channel.h): how process 0 of a multi-process
// group tells the others which KV pools to create and which forward steps to run, so that every
// process enters the same collectives in the same order (the leader/worker model of vLLM and
// TensorRT-LLM). Little-endian, length-prefixed frames:
//
//   header (20 bytes): magic "DBXS" | version u16 | type u16 | seq u64 | payload bytes u32
//
// seq counts the frames of one direction of one connection from 0, so a lost or repeated frame is
// an error, not a silent skew. Payloads are decoded with every count checked against the bytes
// left, so truncated, oversized or garbage input is a DBRX_ERR_IO naming what was wrong.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "dbrx/dbrx.h"
#include "model/backend.h"

namespace dbrx::dist {

inline constexpr uint8_t kStepMagic[4] = {'D', 'B', 'X', 'S'};
inline constexpr uint16_t kStepVersion = 1;
inline constexpr size_t kStepHeaderBytes = 20;
// Largest payload either side accepts (a step of 256 sequences with 32K-token block tables is ~2 MiB).
inline constexpr uint32_t kMaxStepPayload = 64u << 20;
inline constexpr uint32_t kMaxStepMessageText = 1u << 16;

enum class StepMsg : uint16_t {
    Hello = 1,        // follower -> leader: rank, world size
    Welcome = 2,      // leader -> follower: a StepReply (OK, or why the group was refused)
    CreatePool = 3,   // leader -> followers: StepPoolCommand; each answers with a StepReply
    DestroyPool = 4,  // leader -> followers: pool id
    Step = 5,         // leader -> followers: StepCommand (no answer: the collectives are the answer)
    Query = 6,        // leader -> followers: what (StepQuery); each answers with a StepReply
    Reply = 7,        // follower -> leader
    Heartbeat = 8,    // leader -> followers while idle, so a silent leader is a dead one
    Shutdown = 9,     // leader -> followers: dbrx_model_free on process 0
    Failed = 10,      // follower -> leader: a StepReply saying why this process stopped
};
const char *step_msg_name(StepMsg type);

struct StepFrameHeader {
    StepMsg type = StepMsg::Heartbeat;
    uint64_t seq = 0;
    uint32_t payload_bytes = 0;
};

std::vector<uint8_t> encode_step_header(const StepFrameHeader &h);
// Throws DBRX_ERR_IO for a wrong magic word (not a step channel), another version, an unknown
// type or a payload over kMaxStepPayload.
StepFrameHeader decode_step_header(std::span<const uint8_t> bytes);

// One sequence of a step, owning its data (SeqStep only views).
struct StepSeq {
    std::vector<int32_t> tokens;
    int32_t pos0 = 0;
    std::vector<int32_t> blocks;
    bool want_logits = false;
};

// Everything that decides which collectives a forward step runs on a rank.
struct StepCommand {
    uint32_t pool = 0;        // the leader's pool id (CreatePool)
    bool summarized = false;  // forward_summarized (with needs) rather than forward
    std::vector<StepSeq> seqs;
    std::vector<LogitsNeed> needs;  // summarized only: one per sequence with want_logits

    static StepCommand from(uint32_t pool, std::span<const SeqStep> batch, bool summarized,
                            std::span<const LogitsNeed> needs);
    // Views into this command (valid while it lives).
    std::vector<SeqStep> views() const;
    int32_t output_rows() const;
};

struct StepPoolCommand {
    uint32_t pool = 0;
    int32_t n_blocks = 0, block_size = 0;
};

enum class StepQuery : uint32_t { KvMemoryAvailable = 1 };

struct StepReply {
    dbrx_status status = DBRX_OK;
    int64_t value = 0;
    std::string message;
};

struct StepHello {
    int32_t rank = 0, world_size = 0;
};

std::vector<uint8_t> encode(const StepCommand &c);
std::vector<uint8_t> encode(const StepPoolCommand &c);
std::vector<uint8_t> encode(const StepReply &r);
std::vector<uint8_t> encode(const StepHello &h);
std::vector<uint8_t> encode_u32(uint32_t v);  // DestroyPool, Query

// Each throws DBRX_ERR_IO naming the field when the payload is cut short, has bytes left over,
// or holds a count or value that cannot be right.
StepCommand decode_step(std::span<const uint8_t> payload);
StepPoolCommand decode_pool(std::span<const uint8_t> payload);
StepReply decode_reply(std::span<const uint8_t> payload);
StepHello decode_hello(std::span<const uint8_t> payload);
uint32_t decode_u32(std::span<const uint8_t> payload, const char *what);

}  // namespace dbrx::dist
