//go:build tools

// Package tools pins promtool, which checks and unit-tests the chart's Prometheus rules
// (charts/acs-identity-operator/files/prometheus-rules.yaml; scripts/check-alerts.sh builds it).
// The build tag keeps this file out of every build; it only makes `go mod tidy` keep the
// requirement.
package tools

import _ "github.com/prometheus/prometheus/cmd/promtool"
