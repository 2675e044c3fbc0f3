"""Monitoring: conversion by model and arm, drift, guardrail health, fairness."""
