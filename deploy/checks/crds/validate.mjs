// Validates Prometheus Operator resources (monitoring.coreos.com/v1: PodMonitor,
// ServiceMonitor, PrometheusRule...) against the schemas of the operator's
// CRDs, as shipped by @kubernetes-models/prometheus-operator (pinned in
// package-lock.json): types, enums, required fields. deploy/check.sh crds runs
//
//   node validate.mjs NODE_MODULES DOCS.json
//
// NODE_MODULES: where scripts/ensure-node-packages.sh installed package-lock.json
// (ES modules do not read NODE_PATH); DOCS.json: a JSON array of resources.
// and it prints one line per resource; exit status 1 when any is invalid.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [nodeModules, docsFile] = process.argv.slice(2);
const v1 = await import(pathToFileURL(
  join(nodeModules, "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js")).href);
const docs = JSON.parse(readFileSync(docsFile, "utf8"));
let invalid = 0;
for (const doc of docs) {
  const name = `${doc.kind}/${doc.metadata?.name}`;
  const Model = doc.apiVersion === "monitoring.coreos.com/v1" ? v1[doc.kind] : undefined;
  if (typeof Model !== "function") {
    console.log(`FAIL ${name}: no schema for ${doc.apiVersion} ${doc.kind}`);
    invalid++;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`ok ${name}`);
  } catch (error) {
    console.log(`FAIL ${name}: ${error.message}`);
    invalid++;
  }
}
if (docs.length === 0) {
  console.log("FAIL no monitoring.coreos.com resources to validate");
  invalid++;
}
process.exit(invalid ? 1 : 0);
