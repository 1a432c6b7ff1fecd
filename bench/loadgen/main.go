// Command sidecar-loadgen is the benchmark's load process: gRPC clients in a process of
// their own, printing one JSON result line (bench/run.py reads it).
//
//	sidecar-loadgen TARGET open --rate 1000 --seconds 5 --calls calls.bin
//	sidecar-loadgen TARGET closed --concurrency 64 --seconds 5 --calls calls.bin
//
// TARGET is unix:/path/to.sock or host:port. Open loop starts calls on a fixed schedule
// whatever the answers' latency (so queueing shows in the percentiles); closed loop keeps
// --concurrency calls in flight to find saturation. Calls go round-robin over --channels
// connections; --tls-dir (svid.pem, key.pem, bundle.pem) turns on mTLS with the server
// name sidecar.local. It runs Go code on one thread (--procs 1): on a 2-core machine
// shared with the server under test, that costs the least CPU per call.
//
// The call mix is defined once, in Python (bench/calls.py call_mix), which writes the
// serialized sidecar.v1.AuthorizeRequest messages to the --calls file: each message is a
// 4-byte big-endian length followed by that many bytes. They are sent as they are (a raw
// bytes codec, no generated stubs); from each AuthorizeResponse only the outcome and the
// first reason are read.
//
// After 50 warm-up calls it prints "warmed" (bench/run.py starts its measurement window
// there), then runs for --seconds and prints the result: calls, errors, seconds,
// throughput, cpu_seconds (this process's user+system CPU over the measured window),
// latency_ms {p50,p90,p99,max}, the same per outcome (latency_ms_by_outcome), outcomes,
// and fail_closed (denies that stand in for a decision, by reason code).
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

const (
	method      = "/sidecar.v1.ToolGate/Authorize"
	callTimeout = 10 * time.Second
	warmupCalls = 50
	serverName  = "sidecar.local" // the DNS SAN on the sidecar's SVID (bench/run.py)
)

// Field numbers of sidecar.v1.AuthorizeResponse (protos/sidecar/v1/sidecar.proto).
const (
	fieldOutcome protowire.Number = 1
	fieldReasons protowire.Number = 2
)

// Outcome enum values (sidecar.v1.Outcome) to the names in the result; anything else,
// OUTCOME_UNSPECIFIED included, counts as "unspecified".
var outcomeNames = map[uint64]string{1: "allow", 2: "deny", 3: "escalate"}

// rawCodec sends the request bytes as they are and hands back the response bytes.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	b, ok := v.([]byte)
	if !ok {
		return nil, fmt.Errorf("raw codec: cannot marshal %T", v)
	}
	return b, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	p, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("raw codec: cannot unmarshal into %T", v)
	}
	*p = append((*p)[:0], data...)
	return nil
}

// Name is the content-subtype: application/grpc+proto, what the messages are.
func (rawCodec) Name() string { return "proto" }

// readCalls reads the length-prefixed messages bench/calls.py writes.
func readCalls(path string) ([][]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var calls [][]byte
	for len(data) > 0 {
		if len(data) < 4 {
			return nil, fmt.Errorf("%s: truncated length prefix", path)
		}
		n := binary.BigEndian.Uint32(data)
		data = data[4:]
		if uint64(n) > uint64(len(data)) {
			return nil, fmt.Errorf("%s: message of %d bytes runs past the end", path, n)
		}
		calls = append(calls, data[:n])
		data = data[n:]
	}
	if len(calls) == 0 {
		return nil, fmt.Errorf("%s: no calls", path)
	}
	return calls, nil
}

// parseResponse reads the outcome and the first reason of an AuthorizeResponse.
func parseResponse(b []byte) (outcome uint64, firstReason string, err error) {
	haveReason := false
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return 0, "", protowire.ParseError(n)
		}
		b = b[n:]
		switch {
		case num == fieldOutcome && typ == protowire.VarintType:
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return 0, "", protowire.ParseError(m)
			}
			outcome, n = v, m
		case num == fieldReasons && typ == protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return 0, "", protowire.ParseError(m)
			}
			if !haveReason {
				firstReason, haveReason = string(v), true
			}
			n = m
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return 0, "", protowire.ParseError(n)
			}
		}
		b = b[n:]
	}
	return outcome, firstReason, nil
}

// failClosedCode is the reason code of a deny that stands in for a decision the sidecar
// could not make (policy_*, overloaded, evidence_unavailable: the code before the first
// ":" of the first reason), or "".
func failClosedCode(reason string) string {
	code, _, _ := strings.Cut(reason, ":")
	if strings.HasPrefix(code, "policy_") || code == "overloaded" || code == "evidence_unavailable" {
		return code
	}
	return ""
}

// tally collects the answers of the measured window.
type tally struct {
	mu         sync.Mutex
	latencies  []float64            // milliseconds
	byOutcome  map[string][]float64 // the same latencies, by the answer's outcome
	outcomes   map[string]int
	failClosed map[string]int
	errors     int
	errorCodes map[string]int // the calls that failed, by grpc-go's name of their status code (or malformed_answer)
}

func newTally() *tally {
	return &tally{byOutcome: map[string][]float64{}, outcomes: map[string]int{}, failClosed: map[string]int{},
		errorCodes: map[string]int{}}
}

func (t *tally) reset() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.latencies = t.latencies[:0]
	clear(t.byOutcome)
	clear(t.outcomes)
	clear(t.failClosed)
	clear(t.errorCodes)
	t.errors = 0
}

type loader struct {
	conns []*grpc.ClientConn
	calls [][]byte
	tally *tally
}

// one makes call number i and records its answer.
func (l *loader) one(i int) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	var reply []byte
	started := time.Now()
	err := l.conns[i%len(l.conns)].Invoke(ctx, method, l.calls[i%len(l.calls)], &reply)
	elapsed := time.Since(started)
	var outcome uint64
	var reason string
	code := ""
	if err != nil {
		code = status.Code(err).String()
	} else if outcome, reason, err = parseResponse(reply); err != nil {
		code = "malformed_answer"
	}
	t := l.tally
	t.mu.Lock()
	defer t.mu.Unlock()
	if err != nil {
		t.errors++
		t.errorCodes[code]++
		return
	}
	ms := float64(elapsed.Nanoseconds()) / 1e6
	t.latencies = append(t.latencies, ms)
	name, ok := outcomeNames[outcome]
	if !ok {
		name = "unspecified"
	}
	t.byOutcome[name] = append(t.byOutcome[name], ms)
	t.outcomes[name]++
	if code := failClosedCode(reason); code != "" {
		t.failClosed[code]++
	}
}

// percentiles: the sample at index int(q*n) of the n sorted latencies (as the Python load
// process that came before computed them, so figures stay comparable).
func percentiles(latencies []float64) map[string]float64 {
	if len(latencies) == 0 {
		return map[string]float64{}
	}
	ordered := slices.Clone(latencies)
	slices.Sort(ordered)
	at := func(q float64) float64 {
		return ordered[min(len(ordered)-1, int(q*float64(len(ordered))))]
	}
	return map[string]float64{"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": ordered[len(ordered)-1]}
}

// cpuSeconds is this process's CPU time so far, user + system, all threads.
func cpuSeconds() float64 {
	var usage syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &usage); err != nil {
		return 0
	}
	return time.Duration(usage.Utime.Nano() + usage.Stime.Nano()).Seconds()
}

func transportCredentials(tlsDir string) (credentials.TransportCredentials, error) {
	if tlsDir == "" {
		return insecure.NewCredentials(), nil
	}
	pair, err := tls.LoadX509KeyPair(filepath.Join(tlsDir, "svid.pem"), filepath.Join(tlsDir, "key.pem"))
	if err != nil {
		return nil, err
	}
	bundle, err := os.ReadFile(filepath.Join(tlsDir, "bundle.pem"))
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(bundle) {
		return nil, fmt.Errorf("%s: no certificates", filepath.Join(tlsDir, "bundle.pem"))
	}
	return credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{pair}, RootCAs: roots, ServerName: serverName}), nil
}

type options struct {
	target, mode, callsFile, tlsDir string
	rate, seconds                   float64
	concurrency, channels, procs    int
}

// parseArgs takes TARGET and MODE wherever they stand among the flags, like argparse.
func parseArgs(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("sidecar-loadgen", flag.ContinueOnError)
	fs.Float64Var(&o.rate, "rate", 100, "calls started per second (open loop)")
	fs.IntVar(&o.concurrency, "concurrency", 32, "calls in flight (closed loop)")
	fs.Float64Var(&o.seconds, "seconds", 5, "length of the measured window")
	fs.IntVar(&o.channels, "channels", 4, "connections, used round-robin")
	fs.StringVar(&o.tlsDir, "tls-dir", "", "directory with svid.pem, key.pem, bundle.pem for mTLS")
	fs.IntVar(&o.procs, "procs", 1, "Go threads running code at once (GOMAXPROCS): one leaves the other cores to the server")
	fs.StringVar(&o.callsFile, "calls", "", "the call mix: length-prefixed AuthorizeRequest messages (bench/calls.py)")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: sidecar-loadgen TARGET {open,closed} --calls FILE [flags]")
		fs.PrintDefaults()
	}
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return o, err
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		positional, args = append(positional, args[0]), args[1:]
	}
	switch {
	case len(positional) != 2:
		return o, errors.New("want TARGET and MODE (open or closed)")
	case positional[1] != "open" && positional[1] != "closed":
		return o, fmt.Errorf("mode %q: use open or closed", positional[1])
	case o.callsFile == "":
		return o, errors.New("--calls FILE is required")
	case o.channels < 1 || o.concurrency < 1 || o.procs < 1 || o.rate <= 0 || o.seconds <= 0:
		return o, errors.New("--channels, --concurrency, --procs, --rate and --seconds must be positive")
	}
	o.target, o.mode = positional[0], positional[1]
	return o, nil
}

type result struct {
	Mode        string             `json:"mode"`
	TargetRate  *float64           `json:"target_rate"`
	Concurrency *int               `json:"concurrency"`
	Calls       int                `json:"calls"`
	Errors      int                `json:"errors"`
	ErrorCodes  map[string]int     `json:"error_codes"`
	Seconds     float64            `json:"seconds"`
	Throughput  float64            `json:"throughput"`
	CPUSeconds  float64            `json:"cpu_seconds"`
	LatencyMs   map[string]float64 `json:"latency_ms"`
	// The percentiles of each outcome's answers alone: where the tail comes from.
	LatencyByOutcome map[string]map[string]float64 `json:"latency_ms_by_outcome"`
	Outcomes         map[string]int                `json:"outcomes"`
	FailClosed       map[string]int                `json:"fail_closed"`
}

func run(o options) (*result, error) {
	calls, err := readCalls(o.callsFile)
	if err != nil {
		return nil, err
	}
	creds, err := transportCredentials(o.tlsDir)
	if err != nil {
		return nil, err
	}
	l := &loader{calls: calls, tally: newTally()}
	for range o.channels {
		conn, err := grpc.NewClient(o.target, grpc.WithTransportCredentials(creds),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})),
			// Fixed flow-control windows turn off BDP estimation, whose PINGs cost
			// both sides a read and a write on most responses here; the messages are small.
			grpc.WithInitialWindowSize(1<<20), grpc.WithInitialConnWindowSize(1<<20))
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		l.conns = append(l.conns, conn)
	}

	// Warm up connections and the server's first-call paths.
	var wg sync.WaitGroup
	for i := range warmupCalls {
		wg.Go(func() { l.one(i) })
	}
	wg.Wait()
	l.tally.reset()
	fmt.Println("warmed") // bench/run.py starts its measurement window here

	began := time.Now()
	cpuBegan := cpuSeconds()
	if o.mode == "open" {
		total := int(o.rate * o.seconds)
		interval := float64(time.Second) / o.rate
		for i := range total {
			if delay := time.Until(began.Add(time.Duration(float64(i) * interval))); delay > 0 {
				time.Sleep(delay)
			}
			wg.Go(func() { l.one(i) })
		}
	} else {
		var next atomic.Int64
		deadline := began.Add(time.Duration(o.seconds * float64(time.Second)))
		for range o.concurrency {
			wg.Go(func() {
				for time.Now().Before(deadline) {
					l.one(int(next.Add(1) - 1))
				}
			})
		}
	}
	wg.Wait()
	elapsed := time.Since(began).Seconds()
	cpu := cpuSeconds() - cpuBegan

	t := l.tally
	t.mu.Lock()
	defer t.mu.Unlock()
	r := &result{
		Mode: o.mode, Calls: len(t.latencies), Errors: t.errors, ErrorCodes: maps.Clone(t.errorCodes), Seconds: elapsed,
		Throughput: float64(len(t.latencies)) / elapsed, CPUSeconds: cpu,
		LatencyMs: percentiles(t.latencies), LatencyByOutcome: map[string]map[string]float64{},
		Outcomes: t.outcomes, FailClosed: t.failClosed,
	}
	for name, latencies := range t.byOutcome {
		r.LatencyByOutcome[name] = percentiles(latencies)
	}
	if o.mode == "open" {
		r.TargetRate = &o.rate
	} else {
		r.Concurrency = &o.concurrency
	}
	return r, nil
}

func main() {
	o, err := parseArgs(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "sidecar-loadgen:", err)
		os.Exit(2)
	}
	// One P by default: no idle P spinning to steal work on every wake-up, which on a
	// 2-core machine costs more CPU per call than the calls themselves at open-loop rates.
	runtime.GOMAXPROCS(o.procs)
	r, err := run(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sidecar-loadgen:", err)
		os.Exit(1)
	}
	line, err := json.Marshal(r)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sidecar-loadgen:", err)
		os.Exit(1)
	}
	fmt.Println(string(line))
}
