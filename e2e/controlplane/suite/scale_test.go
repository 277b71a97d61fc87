package suite

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// Scale shape: every DisaggDeployment runs 1 frontend + 8 prefill + 16 decode pods.
const (
	scalePrefill = 8
	scaleDecode  = 16
	scalePods    = 1 + scalePrefill + scaleDecode
)

// TestScale (make e2e-scale): 200 DisaggDeployments of 25 pods each under kwok. Measures
// the time until all are Ready, the operator's reconcile latency and memory, and checks that
// a converged operator writes nothing. Writes its numbers into docs/benchmarks.md.
func TestScale(t *testing.T) {
	if os.Getenv("E2E_SCALE") == "" {
		t.Skip("E2E_SCALE unset: run `make e2e-scale`")
	}
	e := newEnv(t)
	defer e.stopAll()
	e.ns = getenv("E2E_SCALE_NAMESPACE", "tandem-scale")
	scaleDeployments, err := strconv.Atoi(getenv("E2E_SCALE_DEPLOYMENTS", "200"))
	if err != nil || scaleDeployments < 1 {
		t.Fatalf("E2E_SCALE_DEPLOYMENTS=%q: want a positive count", os.Getenv("E2E_SCALE_DEPLOYMENTS"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 38*time.Minute)
	defer cancel()

	e.must(t, e.helm, "upgrade", "--install", "tandem", filepath.Join(e.root, "charts", "tandem-operator"),
		"--namespace", e.opNS, "--create-namespace")
	deps, err := e.kube.AppsV1().Deployments(e.opNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/instance=tandem"})
	if err != nil || len(deps.Items) != 1 {
		t.Fatalf("the chart's operator Deployment: %v", err)
	}
	e.saName = deps.Items[0].Spec.Template.Spec.ServiceAccountName
	e.writeOperatorKubeconfig(t, ctx)
	e.applyYAML(t, fmt.Sprintf(`apiVersion: v1
kind: Namespace
metadata:
  name: %s
  labels: {pod-security.kubernetes.io/enforce: restricted}
`, e.ns))
	eventually(t, time.Minute, "CRD established", func() (bool, string) {
		out, err := e.cmd(e.kubectl, "get", "crd", "disaggdeployments.tandem.dev",
			"-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}")
		return err == nil && out == "True", out
	})
	op := e.startOperator(t, "scale-a", metricsPort(10))
	eventually(t, 30*time.Second, "operator leads", func() (bool, string) {
		h, err := e.leaseHolder(ctx)
		return err == nil && h == "scale-a", fmt.Sprintf("holder %q %v", h, err)
	})

	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, scaleDeployments)
	sem := make(chan struct{}, 8)
	for i := 0; i < scaleDeployments; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			_, err := e.dyn.Resource(ddGVR).Namespace(e.ns).Create(ctx, scaleDD(i), metav1.CreateOptions{})
			if err != nil {
				errs <- err
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("creating DisaggDeployments: %v", err)
	}
	created := time.Since(start)

	var readyDDs, readyPods int
	var lastLog time.Time
	eventually(t, 35*time.Minute, fmt.Sprintf("%d DisaggDeployments Ready", scaleDeployments), func() (bool, string) {
		if op.exited() {
			t.Fatalf("the operator exited (%v) before convergence:\n%s", op.err, op.tail(20))
		}
		readyDDs, readyPods = e.scaleProgress(ctx)
		if time.Since(lastLog) > 30*time.Second {
			t.Logf("%5.0fs: %d/%d DisaggDeployments Ready, %d/%d pods Ready, operator RSS %d MiB",
				time.Since(start).Seconds(), readyDDs, scaleDeployments, readyPods, scaleDeployments*scalePods, rssKiB(op, "VmRSS")/1024)
			lastLog = time.Now()
		}
		time.Sleep(4 * time.Second) // listing 5000 pods is itself load: poll gently
		return readyDDs == scaleDeployments && readyPods == scaleDeployments*scalePods,
			fmt.Sprintf("%d DDs, %d pods Ready", readyDDs, readyPods)
	})
	converged := time.Since(start)
	reconciles, _ := op.metric("tandem_operator_reconcile_total", "")
	errors, _ := op.metric("tandem_operator_reconcile_errors_total", "")
	_, body, err := op.get("/metrics")
	if err != nil {
		t.Fatal(err)
	}
	p50, p99, count := histogramQuantiles(body, "tandem_operator_reconcile_duration_seconds")
	spread := histogramSpread(body, "tandem_operator_reconcile_duration_seconds")
	rss, peak := rssKiB(op, "VmRSS"), rssKiB(op, "VmHWM")
	cpu := fmt.Sprintf("operator %.0f s", cpuSeconds(op.cmd.Process.Pid))
	if dir := os.Getenv("E2E_DIR"); dir != "" {
		for _, c := range []string{"kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok"} {
			if pid, err := os.ReadFile(filepath.Join(dir, c+".pid")); err == nil {
				if n, err := strconv.Atoi(strings.TrimSpace(string(pid))); err == nil {
					cpu += fmt.Sprintf(", %s %.0f s", c, cpuSeconds(n))
				}
			}
		}
	}

	// The API server's side of the operator's latency: time its requests queued in API
	// Priority and Fairness (ServiceAccounts fall in the workload-low level) and the mean
	// server-side apply latency.
	apiSide, timeouts := "n/a", "n/a"
	if raw, err := e.kube.CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(ctx); err == nil {
		body := string(raw)
		mean := func(name, match string) float64 {
			n := sumMetric(body, name+"_count", match)
			if n == 0 {
				return math.NaN()
			}
			return sumMetric(body, name+"_sum", match) / n
		}
		apiSide = fmt.Sprintf("APF queue wait %s, server-side apply %s (means)",
			fmtSeconds(mean("apiserver_flowcontrol_request_wait_duration_seconds", `flow_schema="service-accounts"`)),
			fmtSeconds(mean("apiserver_request_duration_seconds", `verb="APPLY"`)))
		// Requests the API server gave up on (504: its request timeout) or refused (429: APF
		// queues full), every client counted, from the server's own request counter.
		timeouts = fmt.Sprintf("%.0f timed out (504), %.0f rejected (429)",
			sumMetric(body, "apiserver_request_total", `code="504"`),
			sumMetric(body, "apiserver_request_total", `code="429"`))
	}
	applies := func(metric, result string) float64 {
		v, _ := op.metric(metric, `result="`+result+`"`)
		return v
	}
	writes := fmt.Sprintf("children %.0f applied / %.0f unchanged, status %.0f written / %.0f unchanged",
		applies("tandem_operator_child_applies_total", "applied"), applies("tandem_operator_child_applies_total", "unchanged"),
		applies("tandem_operator_status_writes_total", "applied"), applies("tandem_operator_status_writes_total", "unchanged"))

	// Steady state: nothing changes, so the operator must write nothing.
	const quiet = 60 * time.Second
	time.Sleep(10 * time.Second)
	before, err := e.childVersions(ctx)
	if err != nil {
		t.Fatal(err)
	}
	reconcilesBefore, _ := op.metric("tandem_operator_reconcile_total", "")
	appliesBefore := applies("tandem_operator_child_applies_total", "applied") + applies("tandem_operator_status_writes_total", "applied")
	time.Sleep(quiet)
	after, err := e.childVersions(ctx)
	if err != nil {
		t.Fatal(err)
	}
	reconcilesAfter, _ := op.metric("tandem_operator_reconcile_total", "")
	changed := diffVersions(before, after)
	if len(changed) > 0 {
		t.Errorf("converged operator wrote to %d objects in %s:\n  %s", len(changed), quiet, strings.Join(changed[:min(len(changed), 20)], "\n  "))
	}
	// Not even a no-op apply: a converged reconcile reads its children from the watch cache.
	appliesQuiet := applies("tandem_operator_child_applies_total", "applied") + applies("tandem_operator_status_writes_total", "applied") - appliesBefore
	if appliesQuiet > 0 {
		t.Errorf("converged operator sent %.0f applies or status writes in %s", appliesQuiet, quiet)
	}

	section := fmt.Sprintf(`Measured by `+"`make e2e-scale`"+` (%s) on this CPU machine (2 cores shared with other
jobs, 24 GiB): Kubernetes v1.35.4 control plane built from its Go modules (etcd, apiserver,
controller-manager, scheduler on loopback), kwok fake nodes, one operator replica
(release build) authenticated as the chart's ServiceAccount.

| what | value |
| --- | --- |
| DisaggDeployments × pods | %d × %d (1 frontend + %d prefill + %d decode) = %d pods |
| created (API calls) | %.1f s |
| converged: every DisaggDeployment Ready, every pod Ready | %.0f s |
| reconciles until converged | %.0f (%.0f errors), at most %s in flight |
| operator writes until converged | %s |
| reconcile duration p50 / p99 (histogram bucket bounds, %d samples) | ≤ %s / ≤ %s |
| reconciles per duration bucket | %s |
| operator memory: RSS when converged / peak | %.0f MiB / %.0f MiB |
| steady state over %.0f s: objects written / applies sent / reconciles | %d / %.0f / %.0f |
| CPU time until converged (where the time went) | %s |
| API server side of the operator's requests | %s |
| API server requests timed out or rejected until converged | %s |
`, time.Now().UTC().Format("2006-01-02"), scaleDeployments, scalePods, scalePrefill, scaleDecode,
		scaleDeployments*scalePods, created.Seconds(), converged.Seconds(), reconciles, errors,
		getenv("TANDEM_OPERATOR_MAX_CONCURRENT_RECONCILES", "8 (the default)"), writes,
		count, fmtSeconds(p50), fmtSeconds(p99), spread, float64(rss)/1024, float64(peak)/1024,
		quiet.Seconds(), len(changed), appliesQuiet, reconcilesAfter-reconcilesBefore, cpu, apiSide, timeouts)
	fmt.Fprintln(os.Stderr, section)
	if err := writeBenchmarkSection(filepath.Join(e.root, "docs", "benchmarks.md"), section); err != nil {
		t.Fatal(err)
	}
}

func scaleDD(i int) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "tandem.dev/v1alpha1",
		"kind":       "DisaggDeployment",
		"metadata":   map[string]any{"name": fmt.Sprintf("scale-%03d", i)},
		"spec": map[string]any{
			"model": map[string]any{"name": "m", "source": "file:///models/m.gguf"},
			"image": "example.com/tandem-worker:scale",
			"frontend": map[string]any{
				"replicas":  int64(1),
				"resources": map[string]any{"requests": map[string]any{"cpu": "100m", "memory": "64Mi"}},
			},
			"prefill": map[string]any{
				"replicas": int64(scalePrefill), "gpusPerReplica": int64(0),
				"resources": map[string]any{"requests": map[string]any{"cpu": "100m", "memory": "64Mi"}},
			},
			"decode": map[string]any{
				"replicas": int64(scaleDecode), "gpusPerReplica": int64(0),
				"resources": map[string]any{"requests": map[string]any{"cpu": "100m", "memory": "64Mi"}},
			},
		},
	}}
}

// scaleProgress counts DisaggDeployments Ready at their current generation and Ready pods.
func (e *env) scaleProgress(ctx context.Context) (int, int) {
	dds, err := e.dyn.Resource(ddGVR).Namespace(e.ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return 0, 0
	}
	readyDDs := 0
	for i := range dds.Items {
		dd := &dds.Items[i]
		status, _, _, gen := condition(dd, "Ready")
		observed, _, _ := unstructured.NestedInt64(dd.Object, "status", "observedGeneration")
		if status == "True" && gen == dd.GetGeneration() && observed == dd.GetGeneration() {
			readyDDs++
		}
	}
	pods, err := e.kube.CoreV1().Pods(e.ns).List(ctx, metav1.ListOptions{LabelSelector: "tandem.dev/deployment", ResourceVersion: "0"})
	if err != nil {
		return readyDDs, 0
	}
	readyPods := 0
	for i := range pods.Items {
		p := &pods.Items[i]
		if p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" && podReady(p) {
			readyPods++
		}
	}
	return readyDDs, readyPods
}

// rssKiB reads a memory line (VmRSS, VmHWM) of the operator process from /proc.
func rssKiB(p *operatorProc, field string) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, field+":") {
			f := strings.Fields(line)
			if len(f) >= 2 {
				v, _ := strconv.ParseInt(f[1], 10, 64)
				return v
			}
		}
	}
	return 0
}

// cpuSeconds is the user+system CPU time a process has used, from /proc/<pid>/stat.
func cpuSeconds(pid int) float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return math.NaN()
	}
	// Fields after the parenthesised command name; utime and stime are the 14th and 15th.
	rest := string(data)
	if i := strings.LastIndexByte(rest, ')'); i >= 0 {
		rest = rest[i+1:]
	}
	f := strings.Fields(rest)
	if len(f) < 13 {
		return math.NaN()
	}
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	const clockTicks = 100 // USER_HZ on Linux
	return (utime + stime) / clockTicks
}

var bucketRe = regexp.MustCompile(`le="([^"]+)"\}\s+(\S+)`)

// histogramQuantiles returns the upper bounds of the buckets holding p50 and p99 of a
// Prometheus histogram, and its sample count.
func histogramQuantiles(body, name string) (p50, p99 float64, count int64) {
	type bucket struct{ le, n float64 }
	var buckets []bucket
	for _, line := range strings.Split(body, "\n") {
		if !strings.HasPrefix(line, name+"_bucket") {
			continue
		}
		m := bucketRe.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		le, err1 := strconv.ParseFloat(m[1], 64)
		if m[1] == "+Inf" {
			le, err1 = math.Inf(1), nil
		}
		n, err2 := strconv.ParseFloat(m[2], 64)
		if err1 == nil && err2 == nil {
			buckets = append(buckets, bucket{le, n})
		}
	}
	sort.Slice(buckets, func(i, j int) bool { return buckets[i].le < buckets[j].le })
	if len(buckets) == 0 {
		return math.NaN(), math.NaN(), 0
	}
	total := buckets[len(buckets)-1].n
	q := func(f float64) float64 {
		for _, b := range buckets {
			if b.n >= f*total {
				return b.le
			}
		}
		return math.Inf(1)
	}
	return q(0.5), q(0.99), int64(total)
}

// histogramSpread renders a Prometheus histogram as "≤ bound: count" per non-empty bucket.
func histogramSpread(body, name string) string {
	var parts []string
	prev := 0.0
	type bucket struct{ le, n float64 }
	var buckets []bucket
	for _, line := range strings.Split(body, "\n") {
		if !strings.HasPrefix(line, name+"_bucket") {
			continue
		}
		if m := bucketRe.FindStringSubmatch(line); m != nil {
			le, err := strconv.ParseFloat(m[1], 64)
			if m[1] == "+Inf" {
				le, err = math.Inf(1), nil
			}
			n, err2 := strconv.ParseFloat(m[2], 64)
			if err == nil && err2 == nil {
				buckets = append(buckets, bucket{le, n})
			}
		}
	}
	sort.Slice(buckets, func(i, j int) bool { return buckets[i].le < buckets[j].le })
	for _, b := range buckets {
		if b.n > prev {
			parts = append(parts, fmt.Sprintf("≤ %s: %.0f", fmtSeconds(b.le), b.n-prev))
		}
		prev = b.n
	}
	return strings.Join(parts, ", ")
}

func fmtSeconds(s float64) string {
	switch {
	case math.IsInf(s, 1):
		return "+Inf"
	case s < 1:
		return fmt.Sprintf("%.0f ms", s*1000)
	default:
		return fmt.Sprintf("%.1f s", s)
	}
}

const (
	benchBegin = "<!-- e2e-scale:begin -->"
	benchEnd   = "<!-- e2e-scale:end -->"
)

// writeBenchmarkSection replaces (or appends) the operator scale section of docs/benchmarks.md.
func writeBenchmarkSection(path, body string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	doc := string(data)
	block := benchBegin + "\n" + body + benchEnd
	if i, j := strings.Index(doc, benchBegin), strings.Index(doc, benchEnd); i >= 0 && j > i {
		doc = doc[:i] + block + doc[j+len(benchEnd):]
	} else {
		doc = strings.TrimRight(doc, "\n") + "\n\n## Operator at scale: 200 DisaggDeployments under kwok\n\n" + block + "\n"
	}
	return os.WriteFile(path, []byte(doc), 0o644)
}
