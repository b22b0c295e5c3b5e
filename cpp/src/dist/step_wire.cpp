#include "dist/step_wire.h"

#include <algorithm>
#include <cstring>

#include "util/error.h"

namespace dbrx::dist {
namespace {

std::string num(int64_t v) { return std::to_string(v); }

[[noreturn]] void bad(const std::string &what) { fail(DBRX_ERR_IO, "step channel: " + what); }

class Writer {
public:
    void u8(uint8_t v) { out_.push_back(v); }
    void u16(uint16_t v) { bytes(v, 2); }
    void u32(uint32_t v) { bytes(v, 4); }
    void u64(uint64_t v) { bytes(v, 8); }
    void i32(int32_t v) { u32(static_cast<uint32_t>(v)); }
    void f32(float v) {
        uint32_t bits;
        std::memcpy(&bits, &v, 4);
        u32(bits);
    }
    void ints(std::span<const int32_t> v) {
        u32(static_cast<uint32_t>(v.size()));
        for (int32_t x : v) i32(x);
    }
    void text(const std::string &s) {
        const size_t n = std::min<size_t>(s.size(), kMaxStepMessageText);
        u32(static_cast<uint32_t>(n));
        out_.insert(out_.end(), s.begin(), s.begin() + static_cast<std::ptrdiff_t>(n));
    }
    std::vector<uint8_t> take() { return std::move(out_); }

private:
    void bytes(uint64_t v, int n) {
        for (int i = 0; i < n; ++i) out_.push_back(static_cast<uint8_t>(v >> (8 * i)));
    }
    std::vector<uint8_t> out_;
};

// Reads a payload; every read names the field, so a short or garbled payload says where it broke.
class Reader {
public:
    Reader(std::span<const uint8_t> in, const char *what) : in_(in), what_(what) {}
    uint64_t bytes(int n, const char *field) {
        need(static_cast<size_t>(n), field);
        uint64_t v = 0;
        for (int i = 0; i < n; ++i) v |= uint64_t{in_[at_ + i]} << (8 * i);
        at_ += static_cast<size_t>(n);
        return v;
    }
    uint8_t u8(const char *f) { return static_cast<uint8_t>(bytes(1, f)); }
    uint32_t u32(const char *f) { return static_cast<uint32_t>(bytes(4, f)); }
    int32_t i32(const char *f) { return static_cast<int32_t>(u32(f)); }
    int64_t i64(const char *f) { return static_cast<int64_t>(bytes(8, f)); }
    float f32(const char *f) {
        const uint32_t bits = u32(f);
        float v;
        std::memcpy(&v, &bits, 4);
        return v;
    }
    bool flag(const char *f) {
        const uint8_t v = u8(f);
        if (v > 1) bad(std::string(what_) + ": " + f + " = " + num(v) + " is not a boolean");
        return v == 1;
    }
    // A count of `unit`-byte items, checked against the bytes left before anything is allocated.
    uint32_t count(size_t unit, const char *f) {
        const uint32_t n = u32(f);
        if (unit > 0 && n > (in_.size() - at_) / unit)
            bad(std::string(what_) + ": " + f + " = " + num(n) + " but only " + num(in_.size() - at_) +
                " bytes are left");
        return n;
    }
    std::vector<int32_t> ints(const char *f) {
        std::vector<int32_t> v(count(4, f));
        for (int32_t &x : v) x = i32(f);
        return v;
    }
    std::string text(const char *f) {
        const uint32_t n = count(1, f);
        if (n > kMaxStepMessageText) bad(std::string(what_) + ": " + f + " of " + num(n) + " bytes is too long");
        std::string s(reinterpret_cast<const char *>(in_.data() + at_), n);
        at_ += n;
        return s;
    }
    void done() const {
        if (at_ != in_.size())
            bad(std::string(what_) + ": " + num(in_.size() - at_) + " unexpected bytes after the last field");
    }

private:
    void need(size_t n, const char *field) const {
        if (in_.size() - at_ < n)
            bad(std::string(what_) + " cut short at " + field + " (byte " + num(at_) + " of " + num(in_.size()) + ")");
    }
    std::span<const uint8_t> in_;
    size_t at_ = 0;
    const char *what_;
};

}  // namespace

const char *step_msg_name(StepMsg type) {
    switch (type) {
        case StepMsg::Hello: return "Hello";
        case StepMsg::Welcome: return "Welcome";
        case StepMsg::CreatePool: return "CreatePool";
        case StepMsg::DestroyPool: return "DestroyPool";
        case StepMsg::Step: return "Step";
        case StepMsg::Query: return "Query";
        case StepMsg::Reply: return "Reply";
        case StepMsg::Heartbeat: return "Heartbeat";
        case StepMsg::Shutdown: return "Shutdown";
        case StepMsg::Failed: return "Failed";
    }
    return "unknown";
}

std::vector<uint8_t> encode_step_header(const StepFrameHeader &h) {
    if (h.payload_bytes > kMaxStepPayload)
        invalid_argument("step channel: a " + std::string(step_msg_name(h.type)) + " of " + num(h.payload_bytes) +
                         " bytes exceeds the limit of " + num(kMaxStepPayload));
    Writer w;
    for (uint8_t b : kStepMagic) w.u8(b);
    w.u16(kStepVersion);
    w.u16(static_cast<uint16_t>(h.type));
    w.u64(h.seq);
    w.u32(h.payload_bytes);
    return w.take();
}

StepFrameHeader decode_step_header(std::span<const uint8_t> bytes) {
    if (bytes.size() != kStepHeaderBytes) bad("a frame header has " + num(bytes.size()) + " bytes, not 20");
    if (std::memcmp(bytes.data(), kStepMagic, 4) != 0)
        bad("a frame does not start with the magic word DBXS (not a dbrx step channel, or the stream lost its place)");
    Reader r(bytes.subspan(4), "frame header");
    const uint32_t version = static_cast<uint32_t>(r.bytes(2, "version"));
    if (version != kStepVersion)
        bad("peer speaks step protocol version " + num(version) + ", this build version " + num(kStepVersion) +
            " (run the same dbrx4j build on every process)");
    const uint32_t type = static_cast<uint32_t>(r.bytes(2, "type"));
    if (type < static_cast<uint32_t>(StepMsg::Hello) || type > static_cast<uint32_t>(StepMsg::Failed))
        bad("unknown message type " + num(type));
    StepFrameHeader h;
    h.type = static_cast<StepMsg>(type);
    h.seq = r.bytes(8, "seq");
    h.payload_bytes = r.u32("payload length");
    if (h.payload_bytes > kMaxStepPayload)
        bad(std::string("a ") + step_msg_name(h.type) + " announces " + num(h.payload_bytes) +
            " bytes, over the limit of " + num(kMaxStepPayload));
    return h;
}

StepCommand StepCommand::from(uint32_t pool, std::span<const SeqStep> batch, bool summarized,
                              std::span<const LogitsNeed> needs) {
    StepCommand c;
    c.pool = pool;
    c.summarized = summarized;
    c.seqs.reserve(batch.size());
    for (const SeqStep &s : batch)
        c.seqs.push_back({{s.tokens.begin(), s.tokens.end()}, s.pos0, {s.blocks.begin(), s.blocks.end()}, s.want_logits});
    if (summarized) c.needs.assign(needs.begin(), needs.end());
    return c;
}

std::vector<SeqStep> StepCommand::views() const {
    std::vector<SeqStep> out;
    out.reserve(seqs.size());
    for (const StepSeq &s : seqs) {
        SeqStep v;
        v.tokens = s.tokens;
        v.pos0 = s.pos0;
        v.blocks = s.blocks;
        v.want_logits = s.want_logits;
        out.push_back(v);
    }
    return out;
}

int32_t StepCommand::output_rows() const {
    return static_cast<int32_t>(std::count_if(seqs.begin(), seqs.end(), [](const StepSeq &s) { return s.want_logits; }));
}

std::vector<uint8_t> encode(const StepCommand &c) {
    Writer w;
    w.u32(c.pool);
    w.u8(c.summarized ? 1 : 0);
    w.u32(static_cast<uint32_t>(c.seqs.size()));
    for (const StepSeq &s : c.seqs) {
        w.i32(s.pos0);
        w.u8(s.want_logits ? 1 : 0);
        w.ints(s.tokens);
        w.ints(s.blocks);
    }
    w.u32(static_cast<uint32_t>(c.needs.size()));
    for (const LogitsNeed &n : c.needs) {
        w.i32(n.top_n);
        w.f32(n.temperature);
    }
    return w.take();
}

StepCommand decode_step(std::span<const uint8_t> payload) {
    Reader r(payload, "Step");
    StepCommand c;
    c.pool = r.u32("pool");
    c.summarized = r.flag("summarized");
    // The smallest sequence record (pos0, flag, two empty lists) is 13 bytes.
    c.seqs.resize(r.count(13, "sequence count"));
    for (StepSeq &s : c.seqs) {
        s.pos0 = r.i32("pos0");
        if (s.pos0 < 0) bad("Step: pos0 = " + num(s.pos0) + " is negative");
        s.want_logits = r.flag("want_logits");
        s.tokens = r.ints("tokens");
        s.blocks = r.ints("block table");
    }
    c.needs.resize(r.count(8, "needs count"));
    for (LogitsNeed &n : c.needs) {
        n.top_n = r.i32("top_n");
        n.temperature = r.f32("temperature");
        if (n.top_n < 0 || n.top_n > kMaxLogitsCandidates)
            bad("Step: top_n = " + num(n.top_n) + " outside [0, " + num(kMaxLogitsCandidates) + "]");
    }
    r.done();
    if (!c.summarized && !c.needs.empty()) bad("Step: needs given for a step that is not summarised");
    if (c.summarized && static_cast<int32_t>(c.needs.size()) != c.output_rows())
        bad("Step: " + num(static_cast<int64_t>(c.needs.size())) + " needs for " + num(c.output_rows()) +
            " output rows");
    return c;
}

std::vector<uint8_t> encode(const StepPoolCommand &c) {
    Writer w;
    w.u32(c.pool);
    w.i32(c.n_blocks);
    w.i32(c.block_size);
    return w.take();
}

StepPoolCommand decode_pool(std::span<const uint8_t> payload) {
    Reader r(payload, "CreatePool");
    StepPoolCommand c;
    c.pool = r.u32("pool");
    c.n_blocks = r.i32("n_blocks");
    c.block_size = r.i32("block_size");
    r.done();
    if (c.n_blocks < 1 || c.block_size < 1)
        bad("CreatePool: n_blocks " + num(c.n_blocks) + " and block_size " + num(c.block_size) + " must be >= 1");
    return c;
}

std::vector<uint8_t> encode(const StepReply &rep) {
    Writer w;
    w.u32(static_cast<uint32_t>(rep.status));
    w.u64(static_cast<uint64_t>(rep.value));
    w.text(rep.message);
    return w.take();
}

StepReply decode_reply(std::span<const uint8_t> payload) {
    Reader r(payload, "Reply");
    StepReply rep;
    const uint32_t status = r.u32("status");
    if (status > static_cast<uint32_t>(DBRX_ERR_INTERNAL)) bad("Reply: status " + num(status) + " is not a dbrx_status");
    rep.status = static_cast<dbrx_status>(status);
    rep.value = r.i64("value");
    rep.message = r.text("message");
    r.done();
    return rep;
}

std::vector<uint8_t> encode(const StepHello &h) {
    Writer w;
    w.i32(h.rank);
    w.i32(h.world_size);
    return w.take();
}

StepHello decode_hello(std::span<const uint8_t> payload) {
    Reader r(payload, "Hello");
    StepHello h;
    h.rank = r.i32("rank");
    h.world_size = r.i32("world size");
    r.done();
    return h;
}

std::vector<uint8_t> encode_u32(uint32_t v) {
    Writer w;
    w.u32(v);
    return w.take();
}

uint32_t decode_u32(std::span<const uint8_t> payload, const char *what) {
    Reader r(payload, what);
    const uint32_t v = r.u32("value");
    r.done();
    return v;
}

}  // namespace dbrx::dist
